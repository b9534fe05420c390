"""Shared fixtures: tiny random models saved to disk, packages emitted from their configs on the meta device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The architectures of the emit issue's acceptance list; test_coverage.py runs a larger fixed subset.
CORE_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "opt", "mixtral", "qwen3_moe", "olmo2"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the user's partition cache; the converted SmolLM2 weights are shared read-only."""
    cache = tmp_path_factory.getbasetemp() / "seqgen-cache"
    monkeypatch.setenv("SEQGEN_CACHE", str(cache))
    models = cache / "models"
    real = Path(os.environ.get("SEQGEN_TEST_MODELS", Path.home() / ".cache" / "seqgen" / "models"))
    if not models.exists():
        cache.mkdir(parents=True, exist_ok=True)
        real.mkdir(parents=True, exist_ok=True)
        models.symlink_to(real, target_is_directory=True)


def save_tiny(model_type: str, root: Path) -> tuple[Path, object]:
    from seqgen.models import tiny_model

    model = tiny_model(model_type)
    path = root / model_type / "model"
    model.save_pretrained(path)
    return path, model


def run_fresh(script: str, *args: str, timeout: int = 600) -> dict:
    """Run ``tests/fresh/<script>`` in a new interpreter; it prints one JSON object on its last line."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fresh" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
