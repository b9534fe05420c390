"""Where `seqgen calibrate` may write, checked before any weights load; and bad inputs, each refused with its own
one-line message and exit code, with nothing left behind (every test lists the directories before and after)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from transformers import AutoTokenizer

import seqgen.models
import seqgen.runtime.steps
from seqgen.checkpoint import atomic_directory
from seqgen.cli import cli
from seqgen.errors import OutputRefused
from seqgen.models import tiny_model
from seqgen.outputs import MANIFEST_NAME

ARGS = ["--num-samples", "4", "--seq-len", "32", "--batch-size", "2", "--group-size", "32"]
SIZES = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> Path:
    """A tiny Llama with SmolLM2's tokenizer, in two safetensors shards and an index."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    tiny_model("llama", **SIZES).save_pretrained(path, max_shard_size="15MB")
    AutoTokenizer.from_pretrained(smollm2_tokenizer).save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) == 2
    return path


def listing(*roots: Path) -> dict[str, list[str]]:
    """Every path under ``roots``, relative to each, with hidden (temporary) ones: what a test compares."""
    return {str(root): sorted(str(p.relative_to(root)) for p in root.rglob("*")) for root in roots if root.exists()}


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(result: Result, code: int, message: str) -> None:
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any weights load (memory offload, eval and verify through ``from_pretrained``; disk offload
    through SafetensorsWeights)."""
    import transformers

    import seqgen.job

    def loaded(*args: object, **kwargs: object) -> None:
        pytest.fail("weights were loaded before the refusal")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(loaded))
    monkeypatch.setattr(seqgen.job, "SafetensorsWeights", loaded)


# ---- part 4: output safety -----------------------------------------------------------------------------------------


def test_save_into_or_around_the_model_is_refused_before_anything_loads(
    checkpoint: Path, tmp_path: Path, no_weights: None
) -> None:
    before = listing(checkpoint.parent)
    for save, message in [
        (checkpoint, "it is inside the model checkpoint"),
        (checkpoint / "quantized", "it is inside the model checkpoint"),
        (checkpoint.parent, "it holds the model checkpoint"),
    ]:
        for overwrite in ([], ["--overwrite"]):
            refused(run("calibrate", "--model", checkpoint, *ARGS, "--save", save, *overwrite), 73, message)
    assert listing(checkpoint.parent) == before


def test_save_replaces_only_an_earlier_seqgen_output_and_keeps_the_umask(checkpoint: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    for overwrite in ([], ["--overwrite"]):
        result = run("calibrate", "--model", checkpoint, *ARGS, "--save", foreign, *overwrite)
        refused(result, 73, "is not empty and seqgen did not write it (no seqgen-output.json)")
    assert listing(tmp_path)[str(tmp_path)] == ["notes", "notes/todo.txt"]
    assert (foreign / "todo.txt").read_text() == "keep me"

    out = tmp_path / "out"
    previous = os.umask(0o027)
    try:
        assert run("calibrate", "--model", checkpoint, *ARGS, "--save", out).exit_code == 0
    finally:
        os.umask(previous)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir() if p.name != MANIFEST_NAME)
    assert out.stat().st_mode & 0o777 == 0o750, "the umask's mode, not mkdtemp's 0o700"
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in out.iterdir())
    saved = listing(tmp_path)

    refused(run("calibrate", "--model", checkpoint, *ARGS, "--save", out), 73, "holds an earlier seqgen output")
    (out / "my-eval.txt").write_text("perplexity 12")
    result = run("calibrate", "--model", checkpoint, *ARGS, "--save", out, "--overwrite")
    refused(result, 73, "holds files seqgen did not write (my-eval.txt)")
    assert (out / "my-eval.txt").read_text() == "perplexity 12"
    (out / "my-eval.txt").unlink()
    assert listing(tmp_path) == saved
    result = run("calibrate", "--model", checkpoint, *ARGS, "--save", out, "--overwrite", "--algorithm", "rtn")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == saved, "the same files, nothing beside them"


def test_an_unwritable_save_is_refused_up_front(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_weights: None
) -> None:
    (tmp_path / "file").write_text("")
    refused(run("calibrate", "--model", checkpoint, *ARGS, "--save", tmp_path / "file" / "out"), 73, "not writable")
    real = __import__("tempfile").mkdtemp
    locked = tmp_path / "locked"
    locked.mkdir()

    def mkdtemp(*args: object, dir: object = None, **kwargs: object) -> str:  # noqa: A002 - tempfile's name
        if Path(str(dir)) == locked:  # as a directory without write permission answers (root ignores chmod)
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr("tempfile.mkdtemp", mkdtemp)
    result = run("calibrate", "--model", checkpoint, *ARGS, "--save", locked / "deep" / "out")
    refused(result, 73, f"{locked} is not writable (Permission denied)")
    assert listing(tmp_path)[str(tmp_path)] == ["file", "locked"]


def test_ctrl_c_in_a_disk_offload_run_leaves_no_temporary_directory(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    calls = []
    propagate = seqgen.runtime.steps.propagate

    def interrupted(*args: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        propagate(*args)

    monkeypatch.setattr(seqgen.runtime.steps, "propagate", interrupted)
    args = ["--offload", "disk", "--spill-dir", spill, "--save", tmp_path / "out"]
    result = run("calibrate", "--model", checkpoint, *ARGS, *args)
    assert result.exit_code != 0 and len(calls) == 2, result.output
    assert listing(tmp_path) == {str(tmp_path): ["spill"]}, "no shard beside --save, no spill file"


def test_a_killed_runs_debris_is_removed_by_the_next_run(checkpoint: Path, tmp_path: Path) -> None:
    """SIGKILL leaves ``.NAME.tmp-PID-*`` beside --save and ``seqgen-intermediates-PID-*`` in --spill-dir; the next
    run removes those whose process is gone, and nothing of a live process."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    spill = tmp_path / "spill"
    debris = [tmp_path / f".out.tmp-{pid}-0badc0de", tmp_path / f".out.old-{pid}-0badc0de"]
    debris.append(spill / f"seqgen-intermediates-{pid}-x1y2z3")
    live = spill / f"seqgen-intermediates-{os.getpid()}-live0001"  # a run in progress: kept
    for path in [*debris, live]:
        path.mkdir(parents=True)
        (path / "model-00001.safetensors").write_bytes(b"half")
    args = ["--offload", "disk", "--spill-dir", spill, "--save", tmp_path / "out"]
    assert run("calibrate", "--model", checkpoint, *ARGS, *args).exit_code == 0
    assert not any(path.exists() for path in debris)
    assert sorted(os.listdir(tmp_path)) == ["out", "spill"] and os.listdir(spill) == [live.name]


@pytest.mark.slow
def test_debris_of_a_sigkilled_disk_offload_run_is_removed_by_the_next_run(checkpoint: Path, tmp_path: Path) -> None:
    import signal
    import time

    spill, out = tmp_path / "spill", tmp_path / "out"
    args = ["calibrate", "--model", checkpoint, *ARGS, "--offload", "disk", "--spill-dir", spill, "--save", out]
    proc = subprocess.Popen([sys.executable, "-m", "seqgen", *map(str, args)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (list(tmp_path.glob(".out.tmp-*")) and list(spill.glob("seqgen-intermediates-*"))):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    debris = [*tmp_path.glob(".out.tmp-*"), *spill.glob("seqgen-intermediates-*")]
    assert len(debris) == 2 and all(str(proc.pid) in path.name for path in debris)
    assert run(*args).exit_code == 0
    assert sorted(os.listdir(tmp_path)) == ["out", "spill"] and os.listdir(spill) == []


def test_of_two_writers_of_one_directory_the_first_wins_and_the_other_is_told(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    with pytest.raises(OutputRefused, match="was written by another process while this one was writing it"):
        with atomic_directory(out, replace=False) as mine:
            (mine / "a.py").write_text("mine")
            with atomic_directory(out, replace=False) as theirs:  # finishes first
                (theirs / "a.py").write_text("theirs")
    assert (out / "a.py").read_text() == "theirs" and os.listdir(tmp_path) == ["pkg"]
    with atomic_directory(out, replace=True) as mine:  # removed meanwhile: no one's directory would be replaced
        (mine / "a.py").write_text("mine")
        shutil.rmtree(out)
    assert (out / "a.py").read_text() == "mine" and os.listdir(tmp_path) == ["pkg"]

    # the same with threads that reach the rename together, replacing or not
    for replace in (False, True):
        shutil.rmtree(out)
        barrier, errors = threading.Barrier(2), []

        def write(name: str) -> None:
            try:
                with atomic_directory(out, replace=replace) as tmp:  # noqa: B023 - joined below
                    (tmp / "a.py").write_text(name)
                    barrier.wait()  # noqa: B023
            except OutputRefused as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=write, args=(name,)) for name in ("one", "two")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(errors) == 1 and "written by another process" in errors[0]
        assert (out / "a.py").read_text() in {"one", "two"} and os.listdir(tmp_path) == ["pkg"]


def test_two_emit_processes_to_one_out_give_one_package_and_one_message(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    command = [sys.executable, "-m", "seqgen", "emit", "tiny:llama", str(out)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stdout.read() + p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) in ([0, 1], [0, 73]), results
    loser = next(text for code, text in results if code)
    # the loser learns of the winner where it happens to look: before tracing, at its last check, or at the rename
    assert "Traceback" not in loser and any(
        message in loser
        for message in (
            "already holds a seqgen package",
            "was written by another process while this one was writing it",
            "exists and is not an empty directory (another process may have just written it)",
        )
    ), loser
    assert os.listdir(tmp_path) == ["pkg"] and (out / "index.json").is_file()
    seqgen.load(out)  # whole and intact


# ---- part 6: bad inputs --------------------------------------------------------------------------------------------


def damaged(checkpoint: Path, root: Path, how: str) -> Path:
    """A copy of ``checkpoint`` with its second shard missing, truncated, or its header overwritten."""
    copy = root / f"{how}-ckpt"
    shutil.copytree(checkpoint, copy)
    shard = copy / "model-00002-of-00002.safetensors"
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 1000])
    else:
        data = bytearray(shard.read_bytes())
        data[8:40] = b"\xff" * 32
        shard.write_bytes(bytes(data))
    return copy


DAMAGE = {
    "missing": (66, "lacks model-00002-of-00002.safetensors, which its model.safetensors.index.json lists"),
    "truncated": (65, "model-00002-of-00002.safetensors is truncated: its tensors need"),
    "corrupt": (65, "model-00002-of-00002.safetensors is not safetensors: its header is unreadable"),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_checkpoint_files_are_named_in_calibrate_eval_and_verify(
    checkpoint: Path, tmp_path: Path, how: str, no_weights: None
) -> None:
    model = damaged(checkpoint, tmp_path, how)
    package = tmp_path / "pkg"
    assert run("emit", model, package).exit_code == 0  # the config is whole: emitting needs no weights
    before = listing(tmp_path)
    code, message = DAMAGE[how]
    for offload in ("memory", "disk"):
        args = ["--offload", offload, "--save", tmp_path / "out"]
        refused(run("calibrate", "--model", model, *ARGS, *args), code, message)
    refused(run("eval", "--model", model, "--seq-len", "16", "--max-samples", "2"), code, message)
    refused(run("verify", package, "--model", model), code, message)
    assert listing(tmp_path) == before


def test_a_checkpoint_without_tokenizer_files_is_named(tmp_path: Path, no_weights: None) -> None:
    model = tmp_path / "model"
    tiny_model("qwen2").save_pretrained(model)  # transformers would build an empty Qwen2 tokenizer for it
    before = listing(tmp_path)
    message = f"{model} has no tokenizer files (tokenizer.json, tokenizer_config.json, a vocabulary)"
    refused(run("calibrate", "--model", model, *ARGS, "--save", tmp_path / "out"), 65, message)
    refused(run("eval", "--model", model), 65, message)
    assert listing(tmp_path) == before


def test_a_seqgen_cache_that_is_a_file_or_unwritable_is_named(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_weights: None
) -> None:
    (tmp_path / "cache-file").write_text("")
    monkeypatch.setenv("SEQGEN_CACHE", str(tmp_path / "cache-file"))
    message = f"the seqgen cache {tmp_path / 'cache-file'} ($SEQGEN_CACHE) is a file, not a directory"
    refused(run("calibrate", "--model", checkpoint, *ARGS, "--save", tmp_path / "out"), 73, message)
    refused(run("cache", "list"), 73, message)
    monkeypatch.setenv("SEQGEN_CACHE", str(tmp_path / "cache-file" / "below"))
    result = run("calibrate", "--model", checkpoint, *ARGS, "--save", tmp_path / "out")
    refused(result, 73, f"cannot write the partition cache {tmp_path / 'cache-file' / 'below' / 'partitions'}")
    assert listing(tmp_path)[str(tmp_path)] == ["cache-file"]


def test_cache_rm_with_an_empty_prefix_removes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from seqgen.cache import PartitionCache
    from seqgen.emitter import EmitOptions

    monkeypatch.setenv("SEQGEN_CACHE", str(tmp_path / "cache"))
    cache = PartitionCache()
    cache.get_or_emit(seqgen.models.meta_model("tiny:llama"), EmitOptions())
    before = listing(cache.root)
    for prefix in ("", "  "):
        refused(run("cache", "rm", prefix), 1, "an empty digest prefix names no cache entry")
    assert listing(cache.root) == before and len(cache.entries()) == 1


def nan_checkpoint(checkpoint: Path, root: Path, layer: int) -> Path:
    """``checkpoint`` with one NaN in a layer's attention output projection."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight[3, 5] = float("nan")
    model.save_pretrained(root / "nan-ckpt")
    shutil.copy(checkpoint / "tokenizer.json", root / "nan-ckpt")
    shutil.copy(checkpoint / "tokenizer_config.json", root / "nan-ckpt")
    return root / "nan-ckpt"


@pytest.mark.parametrize(("algorithm", "offload", "layer"), [("gptq", "memory", 1), ("rtn", "disk", 0)])
def test_nan_in_activations_names_the_subgraph_and_module(
    checkpoint: Path, tmp_path: Path, algorithm: str, offload: str, layer: int
) -> None:
    """GPTQ meets the NaN in its calibration pass; RTN computes activations only where something reads them (here
    --observe's statistics, in its calibration pass; the last layer's outputs feed nothing, hence layer 0 there)."""
    model = nan_checkpoint(checkpoint, tmp_path, layer)
    before = listing(tmp_path)
    args = ["--algorithm", algorithm, "--offload", offload, "--save", tmp_path / "out"]
    args += ["--observe"] if algorithm == "rtn" else []
    result = run("calibrate", "--model", model, *ARGS, *args)
    where = f"subgraph_00{layer + 1}, in the output of model.layers.{layer}.self_attn.o_proj (Linear)"
    refused(result, 3, f"NaN or inf first appear in {where}")
    assert listing(tmp_path) == before


def test_a_hessian_no_dampening_factors_names_the_module_after_retries(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cholesky_ex = torch.linalg.cholesky_ex

    def not_positive_definite(a: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor]) -> object:
        cholesky_ex(a, out=out)
        out[1].fill_(1)  # LAPACK's answer for a matrix that is not positive definite
        return out

    monkeypatch.setattr(torch.linalg, "cholesky_ex", not_positive_definite)
    caplog.set_level(logging.WARNING, logger="seqgen.algorithms.gptq")
    before = listing(tmp_path)
    result = run("calibrate", "--model", checkpoint, *ARGS, "--save", tmp_path / "out")
    message = (
        "model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj: GPTQ "
        "could not factor the Hessian (64 inputs): it is not positive definite even with dampening 10"
    )
    refused(result, 3, message)
    retries = [r.getMessage() for r in caplog.records if "retrying with" in r.getMessage()]
    assert retries == [
        f"gptq: Hessian is not positive definite with dampening {a}; retrying with {b}"
        for a, b in [("0.01", "0.1"), ("0.1", "1"), ("1", "10")]
    ]
    assert listing(tmp_path) == before


def test_cuda_out_of_memory_names_the_subgraph_and_what_to_change(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    propagate = seqgen.runtime.steps.propagate

    def out_of_memory(run: object, state: object, sub: seqgen.runtime.steps.SubgraphState) -> None:
        if sub.subgraph.name == "subgraph_001":  # the first decoder layer
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")
        propagate(run, state, sub)

    monkeypatch.setattr(seqgen.runtime.steps, "propagate", out_of_memory)
    before = listing(tmp_path)
    for offload in ("memory", "disk"):
        # no checkpoints: the second job is the first one again, which a checkpoint would have it resume
        args = ["--offload", offload, "--checkpoint-every", "0", "--save", tmp_path / "out"]
        result = run("calibrate", "--model", checkpoint, *ARGS, *args)
        message = (
            "subgraph_001 ran out of memory on cpu (CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB "
            "total)). Pass a smaller --batch-size, or emit the package with finer --targets"
        )
        refused(result, 4, message)
    assert listing(tmp_path) == before
