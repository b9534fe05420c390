"""One atomic directory replace: whatever ends the block, the old directory stays whole and nothing is left over."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import seqgen
from seqgen.algorithms import QuantScheme
from seqgen.checkpoint import SafetensorsWeights, StreamingSaver, atomic_directory
from seqgen.emitter import emit_model
from seqgen.job import _disk_model
from seqgen.models import meta_model, tiny_model
from seqgen.runtime import CalibrationOptions, calibrate
from seqgen.verify import checkpoint_differences, random_batch


@pytest.fixture
def umask() -> Iterator[int]:
    """An unusual umask (group may read, others nothing) for the test, the process's own restored after."""
    mask = 0o027
    previous = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(previous)


def contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def old_directory(parent: Path) -> Path:
    out = parent / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("old a")
    (out / "sub" / "b.txt").write_text("old b")
    return out


def test_a_finished_block_puts_the_new_directory_in_place_with_the_umask_mode(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "parent" / "out"  # the parent is created too
    with atomic_directory(out, replace=False) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.tmp-") and not out.exists()
        (tmp / "a.txt").write_text("new")
    assert contents(out) == {"a.txt": b"new"}
    assert os.listdir(out.parent) == ["out"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask == 0o750  # as `mkdir out` makes it, not mkdtemp's 0o700
    old = old_directory(tmp_path / "replaced")
    with atomic_directory(old, replace=True) as tmp:
        (tmp / "c.txt").write_text("new c")
    assert contents(old) == {"c.txt": b"new c"}
    assert os.listdir(old.parent) == ["out"]
    assert old.stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [True, False])
def test_an_exception_in_the_block_leaves_out_as_it_was(tmp_path: Path, error: type, existing: bool) -> None:
    out = old_directory(tmp_path) if existing else tmp_path / "out"
    before = contents(out) if existing else None
    with pytest.raises(error):
        with atomic_directory(out, replace=True) as tmp:
            (tmp / "a.txt").write_text("half written")
            raise error("stopped while writing")
    assert (contents(out) if out.exists() else None) == before
    assert sorted(os.listdir(tmp_path)) == (["out"] if existing else [])


def test_a_generator_closed_in_the_block_leaves_out_as_it_was(tmp_path: Path) -> None:
    out = old_directory(tmp_path)
    before = contents(out)

    def writer() -> Iterator[Path]:
        with atomic_directory(out, replace=True) as tmp:
            (tmp / "a.txt").write_text("half written")
            yield tmp
            (tmp / "b.txt").write_text("never")

    steps = writer()
    tmp = next(steps)
    assert tmp.is_dir()
    steps.close()  # GeneratorExit at the yield, inside the block
    assert contents(out) == before and os.listdir(tmp_path) == ["out"]


def test_a_failed_swap_puts_the_old_directory_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = old_directory(tmp_path)
    before = contents(out)
    real_replace = os.replace

    def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        if Path(source).name.startswith(".out.tmp-"):
            raise OSError("the new directory cannot be moved in")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="cannot be moved in"):
        with atomic_directory(out, replace=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert contents(out) == before and os.listdir(tmp_path) == ["out"]


def test_without_replace_only_a_missing_or_empty_directory_is_taken(tmp_path: Path) -> None:
    out = old_directory(tmp_path)
    before = contents(out)
    with pytest.raises(seqgen.errors.OutputRefused, match="exists and is not an empty directory"):
        with atomic_directory(out, replace=False) as tmp:
            (tmp / "a.txt").write_text("new")
    assert contents(out) == before and os.listdir(tmp_path) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty, replace=False) as tmp:
        (tmp / "a.txt").write_text("new")
    assert contents(empty) == {"a.txt": b"new"} and sorted(os.listdir(tmp_path)) == ["empty", "out"]


def test_an_emit_that_fails_keeps_the_package_it_would_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The emitter writes through the same helper: Ctrl-C while it writes the new files changes nothing."""
    config = tiny_model("llama").config
    out = emit_model(meta_model(config), tmp_path / "pkg").path
    before = contents(out)
    write_text = Path.write_text
    written: list[Path] = []

    def interrupted(path: Path, *args: object, **kwargs: object) -> int:
        if path.parent.name.startswith(".pkg.tmp-") and written:
            raise KeyboardInterrupt
        written.append(path)
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        emit_model(meta_model(config), out, force=True)
    assert written and written[0].parent.name.startswith(".pkg.tmp-")
    assert contents(out) == before and os.listdir(tmp_path) == ["pkg"]


SIZES = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}  # divisible by the group size 32


def test_the_streaming_saver_leaves_nothing_behind_when_the_calibration_stops(tmp_path: Path, umask: int) -> None:
    """A streamed (disk offload) save stopped after its first shard keeps the checkpoint it would replace, and leaves
    no temporary directory; finished, it writes what the in-memory save writes."""
    from seqgen.checkpoint import save_quantized

    model = tiny_model("llama", **SIZES)
    model.save_pretrained(tmp_path / "ckpt")
    package = seqgen.load(emit_model(meta_model(model.config), tmp_path / "pkg").path)
    batches = [random_batch(99, 2, 16, seed=i) for i in range(2)]
    options = CalibrationOptions(scheme=QuantScheme(bits=4, group_size=32))
    memory = save_quantized(model, calibrate(model, package, batches, options).quantized, tmp_path / "memory")

    def streamed(out: Path, stop_after: int | None = None) -> None:
        skeleton = _disk_model(tmp_path / "ckpt", torch.float32)
        weights = SafetensorsWeights(tmp_path / "ckpt", skeleton)
        done: list[str] = []
        with StreamingSaver(skeleton, weights, out, overwrite=True) as saver:

            def add(subgraph: seqgen.Subgraph, quantized: dict, experts: dict) -> None:
                saver.add(subgraph, quantized, experts)
                done.append(subgraph.name)
                if len(done) == stop_after:
                    assert any(saver.tmp.glob("model-*.safetensors")), "a shard was written before the stop"
                    raise KeyboardInterrupt

            calibrate(skeleton, package, batches, options, weights=weights, on_subgraph_done=add, keep_results=False)
        with pytest.raises(seqgen.SeqgenError, match="outside its with block"):
            saver.add(package.subgraphs[0], {})

    streamed(tmp_path / "disk")
    assert checkpoint_differences(memory, tmp_path / "disk") == []
    assert (tmp_path / "disk").stat().st_mode & 0o777 == 0o777 & ~umask
    before = contents(tmp_path / "disk")
    with pytest.raises(KeyboardInterrupt):
        streamed(tmp_path / "disk", stop_after=2)
    assert contents(tmp_path / "disk") == before
    assert not list(tmp_path.glob(".disk.*")), "no temporary directory is left"


def test_the_streaming_saver_writes_only_inside_its_with_block(tmp_path: Path) -> None:
    model = tiny_model("llama", **SIZES)
    model.save_pretrained(tmp_path / "ckpt")
    saver = StreamingSaver(model, SafetensorsWeights(tmp_path / "ckpt"), tmp_path / "out")
    with pytest.raises(seqgen.SeqgenError, match="outside its with block"):
        saver.add(None, {})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
