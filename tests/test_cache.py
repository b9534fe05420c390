"""The partition cache: emit once per fingerprint, reuse without tracing, survive kills and races."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

import seqgen
import seqgen.emitter
from seqgen.cache import PartitionCache
from seqgen.cli import cli
from seqgen.emitter import EmitOptions
from seqgen.models import meta_model


def test_second_lookup_hits_without_tracing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = PartitionCache(tmp_path)
    caplog.set_level(logging.INFO, logger="seqgen.cache")
    first, hit = cache.get_or_emit(meta_model("tiny:llama"), EmitOptions())
    assert not hit and f"partition cache miss: emitting {first.path}" in caplog.text

    def no_tracing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tracer ran on a cache hit")

    monkeypatch.setattr(seqgen.emitter, "trace_model", no_tracing)
    second, hit = cache.get_or_emit(meta_model("tiny:llama"), EmitOptions())
    assert hit and second.path == first.path and f"partition cache hit: {first.path}" in caplog.text


def test_other_options_or_config_miss(tmp_path: Path) -> None:
    cache = PartitionCache(tmp_path)
    base, _ = cache.get_or_emit(meta_model("tiny:llama"), EmitOptions())
    grouped, hit = cache.get_or_emit(meta_model("tiny:llama"), EmitOptions(targets_per_subgraph=2))
    assert not hit and grouped.path != base.path
    model = meta_model("tiny:llama")
    model.config.rms_norm_eps = 1e-3
    changed, hit = cache.get_or_emit(model, EmitOptions())
    assert not hit and changed.path != base.path
    assert len(cache.entries()) == 3


def run_cache_emit(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fresh" / "cache_emit.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_killed_emit_leaves_no_partial_package(tmp_path: Path) -> None:
    env = {**os.environ, "SEQGEN_CACHE": str(tmp_path)}
    proc = run_cache_emit(env, "tiny:llama", "--slow-writes")
    for line in proc.stdout:
        if line.startswith("wrote"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = PartitionCache(tmp_path / "partitions")
    assert cache.entries() == []
    leftovers = [p for p in (tmp_path / "partitions").iterdir() if not p.name.endswith(".lock")]
    assert leftovers and all(p.name.startswith(".") and ".tmp-" in p.name for p in leftovers)
    # the next run emits a complete package, and removes the leftover: the process that wrote it is gone
    done = run_cache_emit(env, "tiny:llama")
    assert json.loads(done.communicate()[0].splitlines()[-1])["hit"] is False
    assert not any(p.exists() for p in leftovers)
    assert len(cache.entries()) == 1
    # prune removes an old leftover it finds (one of another machine, or of an earlier seqgen)
    leftover = tmp_path / "partitions" / ".0123456789abcdef.tmp-deadbeef"
    leftover.mkdir()
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert cache.prune() == [leftover]


def test_concurrent_runs_produce_one_intact_package(tmp_path: Path) -> None:
    env = {**os.environ, "SEQGEN_CACHE": str(tmp_path)}
    procs = [run_cache_emit(env, "tiny:qwen2") for _ in range(2)]
    reports = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(r["hit"] for r in reports) == [False, True]
    assert reports[0]["path"] == reports[1]["path"]
    entries = PartitionCache(tmp_path / "partitions").entries()
    assert len(entries) == 1
    seqgen.load(entries[0].path)  # verifies every hash


def test_cache_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQGEN_CACHE", str(tmp_path))
    package, _ = PartitionCache().get_or_emit(meta_model("tiny:llama"), EmitOptions())
    runner = CliRunner()
    listed = runner.invoke(cli, ["cache", "list"])
    assert listed.exit_code == 0 and package.fingerprint[:16] in listed.output and "LlamaForCausalLM" in listed.output
    shown = runner.invoke(cli, ["cache", "show", package.fingerprint[:8]])
    assert shown.exit_code == 0 and "model.layers.1" in shown.output
    missing = runner.invoke(cli, ["cache", "rm", "ffffffff"])
    assert missing.exit_code == 1 and "no entry" in missing.output
    removed = runner.invoke(cli, ["cache", "rm", package.fingerprint[:8]])
    assert removed.exit_code == 0 and not package.path.exists()
