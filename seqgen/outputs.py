"""Where seqgen may write a checkpoint, and how it recognizes one it wrote.

Every checkpoint seqgen saves holds :data:`MANIFEST_NAME`, written last, listing the files seqgen put there. A
directory is replaced only when it is empty, or when it is a previous seqgen output (``overwrite``) that holds nothing
its manifest does not list: a directory with anyone else's files is never replaced, whatever it holds. The checks
run before a calibration loads any weights (:func:`check_output`), and again when the save starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputRefused
from .version import __version__

__all__ = ["MANIFEST_NAME", "add_to_manifest", "check_output", "check_writable", "foreign_files", "write_manifest"]

MANIFEST_NAME = "seqgen-output.json"
_SHOWN = 5  # foreign files named in a message


def write_manifest(directory: str | os.PathLike[str]) -> None:
    """List every file under ``directory`` in its :data:`MANIFEST_NAME` (written to a temporary name, then renamed):
    the last file a save writes, so a directory that has it is a finished seqgen output."""
    directory = Path(directory)
    files = sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )
    _write_manifest(directory, {"written_by": f"seqgen {__version__}", "files": files})


def _write_manifest(directory: Path, manifest: dict) -> None:
    partial = directory / f".{MANIFEST_NAME}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, directory / MANIFEST_NAME)


def add_to_manifest(directory: Path, name: str) -> None:
    """List the file ``name``, which seqgen just wrote into the finished output ``directory``, in its manifest (a
    directory without a manifest is not seqgen's: nothing is written)."""
    path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    manifest["files"] = sorted({*manifest["files"], name})
    _write_manifest(directory, manifest)


def foreign_files(directory: Path) -> list[str] | None:
    """The files under ``directory`` that its manifest does not list (seqgen did not write them), or ``None`` when it
    has no readable manifest (then seqgen wrote none of it)."""
    try:
        listed = set(json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    present = (str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir())
    return sorted(name for name in present if name not in listed and name != MANIFEST_NAME)


def check_output(
    out: str | os.PathLike[str], *, overwrite: bool, inputs: Iterable[str | os.PathLike[str]] = ()
) -> None:
    """Refuse to save to ``out`` (:class:`OutputRefused`, naming the reason and the fix) when it is a file; equals,
    lies inside or holds one of the ``inputs`` (the model's checkpoint directory); is a non-empty directory that is
    not a seqgen output or holds files its manifest does not list; is a seqgen output and ``overwrite`` is not set;
    or cannot be created (no write permission, a read-only filesystem)."""
    out = Path(out)
    target = out.resolve()
    for source in inputs:
        resolved = Path(source).resolve()
        if target == resolved or resolved in target.parents:
            raise OutputRefused(
                f"cannot save to {out}: it is inside the model checkpoint {source}, which the save would replace or "
                "mix with. Pass a directory outside it."
            )
        if target in resolved.parents:
            raise OutputRefused(
                f"cannot save to {out}: it holds the model checkpoint {source}, which replacing it would delete. "
                "Pass a directory outside it."
            )
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"cannot save to {out}: it is a file. Pass a directory path.")
    if out.is_dir() and any(out.iterdir()):
        _check_replaceable(out, overwrite)
    check_writable(out.parent, str(out))


def _check_replaceable(out: Path, overwrite: bool) -> None:
    foreign = foreign_files(out)
    if foreign is None:
        raise OutputRefused(
            f"cannot save to {out}: the directory is not empty and seqgen did not write it (no {MANIFEST_NAME}), so "
            "it is not replaced. Pass a new or empty directory."
        )
    if foreign:
        more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
        raise OutputRefused(
            f"cannot save to {out}: it holds files seqgen did not write ({', '.join(foreign[:_SHOWN])}{more}), so it "
            "is not replaced. Move them elsewhere, or pass a new directory."
        )
    if not overwrite:
        raise OutputRefused(
            f"cannot save to {out}: it holds an earlier seqgen output. Pass --overwrite to replace it, or a new "
            "directory."
        )


def check_writable(directory: Path, what: str) -> None:
    """Refuse ``what`` when no directory can be made in ``directory`` (or, while it does not exist, in its nearest
    parent that does): a temporary directory is made there and removed at once."""
    parent = directory
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".seqgen-probe-", dir=parent))
    except OSError as exc:
        raise OutputRefused(
            f"cannot write {what}: {parent} is not writable ({exc.strerror}). Use a place where you can create "
            "directories."
        ) from None
