"""Hub model ids (`org/name`, `--revision`) against a hub cache built here in huggingface_hub's layout, offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoTokenizer

from seqgen.cli import cli
from seqgen.index import compute_fingerprint
from seqgen.models import meta_model, tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CALIBRATE = ["--bits", "4", "--group-size", "32", "--num-samples", "2", "--seq-len", "16", "--batch-size", "2"]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> Path:
    """A cache holding ``org/tiny-llama`` at one commit (``main`` points at it), and ``org/config-only`` with its
    tokenizer but no weights, laid out as huggingface_hub keeps them (``models--org--name/refs`` and
    ``snapshots/<commit>``)."""
    cache = tmp_path_factory.mktemp("hub")
    for name, weights in (("tiny-llama", True), ("config-only", False)):
        repo = cache / f"models--org--{name}"
        snapshot = repo / "snapshots" / COMMIT
        model = tiny_model("llama", vocab_size=49152, hidden_size=64, intermediate_size=128, head_dim=16)
        if weights:
            model.save_pretrained(snapshot)
        else:
            model.config.save_pretrained(snapshot)
        AutoTokenizer.from_pretrained(smollm2_tokenizer).save_pretrained(snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    return cache


def seqgen(cache: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (huggingface_hub reads its environment when it is imported), offline."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, env=env)


def test_emit_and_calibrate_a_hub_id_equal_its_local_snapshot(hub_cache: Path, tmp_path: Path) -> None:
    snapshot = hub_cache / "models--org--tiny-llama" / "snapshots" / COMMIT
    for model, name in (("org/tiny-llama", "hub"), (str(snapshot), "local")):
        done = seqgen(hub_cache, "emit", model, str(tmp_path / f"{name}-package"))
        assert done.returncode == 0, done.stderr
        done = seqgen(
            hub_cache, "calibrate", "--model", model, *CALIBRATE, "--revision", COMMIT, "--save", str(tmp_path / name)
        )
        assert done.returncode == 0, done.stderr
    for file in sorted((tmp_path / "local-package").glob("subgraph_*.py")):
        assert (tmp_path / "hub-package" / file.name).read_bytes() == file.read_bytes(), file.name
    for name in ("hub", "local"):  # the snapshot directory is the commit's, however it was named
        index = json.loads((tmp_path / f"{name}-package" / "index.json").read_text())
        assert index["fingerprint"]["hub"] == {"id": "org/tiny-llama", "commit": COMMIT}
    shown = CliRunner().invoke(cli, ["show", str(tmp_path / "hub-package")])
    assert f"emitted from org/tiny-llama at commit {COMMIT}" in shown.output, shown.output
    hub, local = load_file(tmp_path / "hub" / "model.safetensors"), load_file(tmp_path / "local" / "model.safetensors")
    assert hub.keys() == local.keys()
    assert all(torch.equal(hub[name], local[name]) for name in local)


@pytest.mark.parametrize(
    "model,extra,message",
    [
        ("org/absent", (), r"'org/absent' is not a local directory, and not in the Hugging Face cache \(.*hub"),
        ("org/tiny-llama", ("--revision", "v2"), r"'org/tiny-llama@v2' is not a local directory"),
        ("org/config-only", (), r"the cached snapshot of org/config-only \(.*\) has no weights"),
    ],
)
def test_calibrate_names_what_the_cache_lacks(
    hub_cache: Path, tmp_path: Path, model: str, extra: tuple[str, ...], message: str
) -> None:
    done = seqgen(hub_cache, "calibrate", "--model", model, *CALIBRATE, *extra, "--save", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert str(hub_cache) in done.stderr or "no weights" in done.stderr
    assert not (tmp_path / "out").exists()


def test_emit_reads_only_the_config(hub_cache: Path, tmp_path: Path) -> None:
    """A snapshot without weights is enough to emit (emit fetches the config and modeling code only)."""
    done = seqgen(hub_cache, "emit", "org/config-only", str(tmp_path / "package"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "package" / "index.json").is_file()


def test_the_commit_is_recorded_not_digested(tmp_path: Path) -> None:
    """The same config and code from a snapshot and from a directory of another name: one package (one digest), and
    the snapshot's records where it came from."""
    model = meta_model(tiny_config("llama"))
    plain = compute_fingerprint(model, options={}, inputs=[])
    model.config._name_or_path = str(tmp_path / "models--org--tiny-llama" / "snapshots" / COMMIT)
    recorded = compute_fingerprint(model, options={}, inputs=[])
    assert recorded["digest"] == plain["digest"]
    assert "hub" not in plain["fields"]
    assert recorded["fields"]["hub"] == {"id": "org/tiny-llama", "commit": COMMIT}
