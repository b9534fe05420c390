"""One atomic directory replace: a directory is written beside its destination, then renamed into place.

Every directory seqgen writes whole (a package, a checkpoint, the converted SmolLM2 weights) goes through
:func:`atomic_directory`, so a reader finds the old directory or the new one, never a half-written one. No exit path
(an exception, Ctrl-C, a generator closed early) leaves the temporary directory behind; only a killed process does,
as a ``.NAME.tmp-PID-*`` sibling, which the next write of ``NAME`` removes once process ``PID`` is gone
(``seqgen cache prune`` also removes those of the partition cache). Two processes that write one directory at once
do not crash or mix: the first rename wins, and the other gets :class:`~seqgen.errors.OutputRefused`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputRefused

__all__ = ["atomic_directory", "process_alive", "remove_debris"]


@contextmanager
def atomic_directory(out: str | os.PathLike[str], *, replace: bool) -> Iterator[Path]:
    """Yield a new empty directory beside ``out`` to write into; when the block ends without an exception, it is
    renamed to ``out``.

    It sits in ``out``'s parent (created if missing), so the rename stays on one filesystem and is atomic, and it
    gets the mode any directory the user makes gets (``0o777`` less the umask), not ``mkdtemp``'s ``0o700``, and so
    does everything written into it (files ``0o666`` less the umask, whatever wrote them). With
    ``replace``, an existing ``out`` is swapped for it, and put back if the swap fails; without, ``out`` must be
    missing or an empty directory. If another process has put a directory at ``out`` since the block began, nothing
    is replaced and :class:`OutputRefused` says so. On every exit path the temporary directory is gone afterwards
    and, unless the rename succeeded, ``out`` is as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "old"):
        remove_debris(out.parent, f".{out.name}.{kind}-")
    before = _identity(out)
    tmp = _new_sibling(out, "tmp")
    try:
        yield tmp
        _apply_umask(tmp)
        with _locked(out.parent):  # the check and the rename, one process at a time
            if _identity(out) not in (before, None):  # gone meanwhile is fine: nothing of anyone's is replaced
                raise OutputRefused(
                    f"{out} was written by another process while this one was writing it; that output is kept and "
                    "this one discarded. Give each run its own output directory."
                )
            _move_into_place(tmp, out, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_debris(directory: Path, prefix: str) -> list[Path]:
    """Remove the entries ``PREFIX<pid>-<anything>`` of ``directory`` that killed processes left: those whose process
    ``pid`` no longer runs on this machine. Returns what was removed."""
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)-.+")
    removed = []
    for path in directory.glob(f"{_glob_escape(prefix)}*-*"):
        match = pattern.fullmatch(path.name)
        if match and not process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _glob_escape(name: str) -> str:
    """``name`` with the characters ``glob`` treats specially bracketed, so it matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _apply_umask(directory: Path) -> None:
    """Give what ``directory`` holds the modes that the user's umask gives new files and directories: writers that
    go through ``mkstemp`` (safetensors shards saved by transformers) leave ``0o600``."""
    mask = _umask()
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only set it)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.lstat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` itself: no lock file to leave behind. Where the filesystem refuses it
    (NFS emulates ``flock`` with locks that need a file open for writing), the identity check alone remains."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _new_sibling(out: Path, kind: str) -> Path:
    """A new empty directory ``.<out's name>.<kind>-<pid>-<random>`` beside ``out``; ``mkdir`` applies the umask."""
    while True:
        path = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def _move_into_place(tmp: Path, out: Path, *, replace: bool) -> None:
    if not replace or not out.exists():
        try:
            os.rename(tmp, out)  # POSIX: takes the place of an empty directory, fails on any other
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise OutputRefused(
                f"{out} exists and is not an empty directory (another process may have just written it), so it is "
                "not replaced. Pass a new or empty directory."
            ) from None
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
