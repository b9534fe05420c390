"""One atomic directory replace: a directory is written beside its destination, then renamed into place.

Every directory seqgen writes whole (a package, a checkpoint, the converted SmolLM2 weights) goes through
:func:`atomic_directory`, so a reader finds the old directory or the new one, never a half-written one. No exit path
(an exception, Ctrl-C, a generator closed early) leaves the temporary directory behind; only a killed process does,
as a ``.NAME.tmp-*`` sibling (``seqgen cache prune`` removes those of the partition cache).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory"]


@contextmanager
def atomic_directory(out: str | os.PathLike[str], *, replace: bool) -> Iterator[Path]:
    """Yield a new empty directory beside ``out`` to write into; when the block ends without an exception, it is
    renamed to ``out``.

    It sits in ``out``'s parent (created if missing), so the rename stays on one filesystem and is atomic, and it
    gets the mode any directory the user makes gets (``0o777`` less the umask), not ``mkdtemp``'s ``0o700``. With
    ``replace``, an existing ``out`` is swapped for it, and put back if the swap fails; without, the rename fails
    (``OSError``) if ``out`` exists and is not an empty directory. On every exit path the temporary directory is
    gone afterwards and, unless the rename succeeded, ``out`` is as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(out, "tmp")
    try:
        yield tmp
        _move_into_place(tmp, out, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _new_sibling(out: Path, kind: str) -> Path:
    """A new empty directory ``.<out's name>.<kind>-<random>`` beside ``out``; ``mkdir`` applies the umask."""
    while True:
        path = out.parent / f".{out.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def _move_into_place(tmp: Path, out: Path, *, replace: bool) -> None:
    if not replace or not out.exists():
        os.rename(tmp, out)  # POSIX: takes the place of an empty directory, fails on any other
        return
    old = _new_sibling(out, "old")
    try:
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / out.name, out)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
