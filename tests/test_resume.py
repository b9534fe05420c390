"""Crash-safe, resumable calibration: a run killed anywhere resumes from its run directory and saves, bitwise, what an
uninterrupted run saves; a full disk keeps the previous checkpoint; stop signals exit with a resume command.

The oracle is always an uninterrupted run of the same job: the sha256 of every file it saved.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import test_calibrate_cli
from click.testing import CliRunner

import seqgen.faults
import seqgen.run.checkpointer
from seqgen.algorithms import QuantScheme
from seqgen.cli import cli
from seqgen.errors import SeqgenError
from seqgen.faults import FAULT_POINTS
from seqgen.job import CalibrationJob, run_job
from seqgen.report import REPORT_NAME
from seqgen.run import runs_root
from seqgen.runtime import CalibrationOptions

checkpoint = test_calibrate_cli.checkpoint  # the tiny Llama (three subgraphs) with SmolLM2's tokenizer, a fixture

ARGS = ["--bits", "4", "--group-size", "32", "--num-samples", "4", "--seq-len", "32", "--batch-size", "2"]


def digests(directory: Path) -> dict[str, str]:
    """The sha256 of every file under ``directory``, by relative path; of the calibration report, only its modules
    (scheme, tokens and error of each), since it also records wall times and memory peaks."""

    def content(f: Path) -> bytes:
        if f.name == REPORT_NAME:
            return json.dumps(json.loads(f.read_text())["modules"], sort_keys=True).encode()
        return f.read_bytes()

    return {
        str(f.relative_to(directory)): hashlib.sha256(content(f)).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def make_job(checkpoint: Path, tmp_path: Path, save: str, offload: str = "memory", **kwargs: object) -> CalibrationJob:
    spill = tmp_path / "spill" if offload == "disk" else None  # disk offload runs with spilled activations too
    scheme = QuantScheme(bits=4, group_size=32, act_order=True)  # the CLI's defaults
    options = CalibrationOptions(scheme=scheme, spill_dir=spill)
    fields = {"num_samples": 4, "seq_len": 32, "batch_size": 2, "offload": offload, "options": options, **kwargs}
    return CalibrationJob(model_id=str(checkpoint), save_dir=tmp_path / save, **fields)


@pytest.fixture(scope="module")
def reference(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The files an uninterrupted run saves, per offload mode (each computed on first use)."""

    class Saved(dict):
        def __missing__(self, offload: str) -> dict[str, str]:
            tmp = tmp_path_factory.mktemp(f"reference-{offload}")
            run_job(make_job(checkpoint, tmp, "out", offload, checkpoint_every=0))
            self[offload] = digests(tmp / "out")
            return self[offload]

    return Saved()


class Crash(BaseException):
    """What the fault point raises in these in-process tests, where SIGKILL would end pytest too."""


@pytest.fixture
def crash_at(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """``crash_at("compress:6")``: the next job stops there with :class:`Crash` (the fault point's kill, in-process)."""

    def kill(pid: int, signum: int) -> None:
        raise Crash(f"fault point, signal {signum}")

    monkeypatch.setattr(seqgen.faults.os, "kill", kill)

    def arm(point: str | None) -> None:
        monkeypatch.setattr(seqgen.faults, "_arrivals", {})
        if point is None:
            monkeypatch.delenv("SEQGEN_FAULT_POINT", raising=False)
        else:
            monkeypatch.setenv("SEQGEN_FAULT_POINT", point)

    yield arm
    arm(None)


# Points inside the calibration loop: the 6th quantize call (subgraph 2's first), the 12th checkpoint file (in the
# checkpoint after subgraph 1; the subprocess test below kills at random points of every kind)
@pytest.mark.parametrize("offload, point", [("memory", "compress:6"), ("disk", "checkpoint:12")])
def test_a_crashed_run_resumes_to_the_uninterrupted_runs_checkpoint(
    offload: str, point: str, checkpoint: Path, tmp_path: Path, reference: dict, crash_at
) -> None:
    run = tmp_path / "run"
    crash_at(point)
    with pytest.raises(Crash):
        run_job(make_job(checkpoint, tmp_path, "out", offload, run_dir=run))
    crash_at(None)
    manifest = json.loads((run / "manifest.json").read_text())
    assert 1 <= manifest["next_subgraph"] < manifest["subgraphs"]
    summary = run_job(make_job(checkpoint, tmp_path, "out", offload, resume=run))
    assert digests(tmp_path / "out") == reference[offload]
    assert summary.linears == 14 and summary.run_dir == run
    assert json.loads((run / "manifest.json").read_text())["finished"]


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_usable(
    checkpoint: Path, tmp_path: Path, reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    write = seqgen.run.checkpointer.save_tensors

    def full_disk(tensors: dict, path: Path, metadata: dict | None = None) -> None:
        if "boundary-00002" in str(path):  # the second checkpoint's boundary
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(tensors, path, metadata)

    monkeypatch.setattr(seqgen.run.checkpointer, "save_tensors", full_disk)
    with pytest.raises(SeqgenError) as failure:
        run_job(make_job(checkpoint, tmp_path, "out", run_dir=run))
    message = str(failure.value)
    assert "after subgraph 2" in message and "No space left on device" in message
    assert "previous checkpoint is intact" in message and f"--resume {run}" in message
    assert not (tmp_path / "out").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["next_subgraph"] == 1
    assert set(digests(run)) == {*manifest["files"], "job.json", "manifest.json", ".lock"}, "no half-written files"

    monkeypatch.setattr(seqgen.run.checkpointer, "save_tensors", write)
    run_job(make_job(checkpoint, tmp_path, "out", resume=run))
    assert digests(tmp_path / "out") == reference["memory"]


def test_resume_refuses_another_job_naming_what_differs(checkpoint: Path, tmp_path: Path, crash_at) -> None:
    run = tmp_path / "run"
    crash_at("compress:6")
    with pytest.raises(Crash):
        run_job(make_job(checkpoint, tmp_path, "out", run_dir=run))
    crash_at(None)
    other = make_job(checkpoint, tmp_path, "out", resume=run, num_samples=6)
    with pytest.raises(SeqgenError, match=r"cannot resume .*data\.batches \(2 then, 3 now\)") as refused:
        run_job(other)
    assert "options.num_samples (4 then, 6 now)" in str(refused.value)
    eight_bits = CalibrationOptions(scheme=QuantScheme(bits=8, group_size=32, act_order=True))
    with pytest.raises(SeqgenError, match=r"options\.scheme\.bits \(4 then, 8 now\)"):
        run_job(make_job(checkpoint, tmp_path, "out", resume=run, options=eight_bits))
    with pytest.raises(SeqgenError, match="unfinished run .* `--resume "):  # a new run does not replace it
        run_job(make_job(checkpoint, tmp_path, "out", run_dir=run))


def test_default_run_dir_its_deletion_message_and_prune(checkpoint: Path, tmp_path: Path, crash_at) -> None:
    crash_at("compress:6")
    with pytest.raises(Crash):
        run_job(make_job(checkpoint, tmp_path, "out"))
    crash_at(None)
    (run,) = runs_root().iterdir()
    debris = run / ".boundary-00003.tmp-0123abcd" / "b00000-hidden_states.safetensors"  # a killed checkpoint write
    debris.parent.mkdir()
    debris.write_bytes(b"half")
    pruned = CliRunner().invoke(cli, ["cache", "prune"])
    assert pruned.exit_code == 0, pruned.output
    assert run.is_dir() and not debris.parent.exists(), "an unfinished run stays; its debris goes"

    args = ["calibrate", "--model", str(checkpoint), *ARGS, "--save", str(tmp_path / "out"), "--resume", str(run)]
    resumed = CliRunner().invoke(cli, args)
    assert resumed.exit_code == 0, resumed.output
    assert f"run directory {run} (" in resumed.output and f"`rm -r {run}`" in resumed.output
    pruned = CliRunner().invoke(cli, ["cache", "prune"])
    assert str(run) in pruned.output and not run.exists(), "a finished run is pruned"


# ---- the CLI in a subprocess: SIGKILL anywhere, SIGINT and SIGTERM --------------------------------------------------


def seqgen_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seqgen", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["memory", "disk"])
def test_sigkill_at_random_points_then_resume_saves_bitwise_the_uninterrupted_checkpoint(
    offload: str, checkpoint: Path, tmp_path: Path
) -> None:
    """Kill points inside passes, inside compress, inside a checkpoint write and inside the final save, plus one more,
    drawn (seeded) from the points an uninterrupted run reaches."""
    extra = ["--offload", "disk", "--spill-dir", str(tmp_path / "spill")] if offload == "disk" else []
    command = ["calibrate", "--model", str(checkpoint), *ARGS, *extra]
    trace = tmp_path / "trace"
    done = seqgen_cli(*command, "--save", str(tmp_path / "ref"), "--run-dir", str(tmp_path / "ref-run"),
                      SEQGEN_FAULT_TRACE=str(trace))  # fmt: skip
    assert done.returncode == 0, done.stderr
    counts = Counter(trace.read_text().split())
    rng = random.Random(16)
    points = [f"{name}:{rng.randint(1, counts[name])}" for name in FAULT_POINTS]
    points.append(f"{(name := rng.choice(FAULT_POINTS))}:{rng.randint(1, counts[name])}")
    for i, point in enumerate(points):
        save, run = ["--save", str(tmp_path / f"out{i}")], str(tmp_path / f"run{i}")
        killed = seqgen_cli(*command, *save, "--run-dir", run, SEQGEN_FAULT_POINT=point)
        assert killed.returncode == -signal.SIGKILL, f"{point}: {killed.stderr[-2000:]}"
        resumed = seqgen_cli(*command, *save, "--resume", run)
        assert resumed.returncode == 0, f"{point}: {resumed.stderr[-2000:]}"
        assert digests(tmp_path / f"out{i}") == digests(tmp_path / "ref"), f"killed at {point}"


@pytest.mark.slow
@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_signal_checkpoints_prints_the_resume_command_and_exits_128_plus_it(
    signame: str, code: int, checkpoint: Path, tmp_path: Path, reference: dict
) -> None:
    command = ["calibrate", "--model", str(checkpoint), *ARGS, "--save", str(tmp_path / "out")]
    # the signal arrives during subgraph 1's propagation pass: it finishes, is checkpointed, and the job stops
    stopped = seqgen_cli(*command, "--run-dir", str(tmp_path / "run"), SEQGEN_FAULT_POINT=f"pass:5:{signame}")
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr and f"stopped by {signame}" in stopped.stderr
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["next_subgraph"] == 2
    assert not (tmp_path / "out").exists()
    (line,) = [line for line in stopped.stderr.splitlines() if line.startswith("resume with: ")]
    args = shlex.split(line.removeprefix("resume with: "))
    assert args[:2] == ["seqgen", "calibrate"] and args[-2:] == ["--resume", str(tmp_path / "run")]
    resumed = seqgen_cli(*args[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert digests(tmp_path / "out") == reference["memory"]
