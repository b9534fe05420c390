"""A run directory: where one calibration job keeps its latest checkpoint, so that a killed run can be resumed.

Layout (:class:`RunDirectory`)::

    RUN/job.json                     the job's fingerprint, written when the run starts
    RUN/manifest.json                the latest complete checkpoint: which subgraph comes next, the state that
                                     carries between subgraphs, and the sha256 of every file below; written last
    RUN/weights/NNNNN.safetensors    quantized weights of the subgraphs done before subgraph NNNNN (one file per
                                     checkpoint, kept until the run ends)
    RUN/shards/model-*.safetensors   disk offload: the streaming save's finished shards (hard links when the run
                                     directory and --save are on one filesystem)
    RUN/stats/NNNNN.safetensors      activation statistics (--observe)
    RUN/boundary-NNNNN/              the values that flow into subgraph NNNNN, one file per batch and value

A checkpoint writes its new files first and the manifest last (written beside it, then renamed over it), then deletes
what the new manifest no longer lists (the previous boundary). A process killed at any moment therefore leaves a
manifest whose files are all there: at most the subgraphs since that checkpoint are lost. Files no manifest lists are
debris of a killed write, removed on resume and by ``seqgen cache prune``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import SeqgenError
from .fingerprint import JobFingerprint, differences, fingerprint_digest

__all__ = ["MANIFEST", "RunDirectory", "default_run_dir", "prune_runs", "runs_root", "sha256_file"]

logger = logging.getLogger(__name__)

JOB = "job.json"
MANIFEST = "manifest.json"
_LOCK = ".lock"
_OWN = {JOB, MANIFEST, _LOCK}
SCHEMA = 1


def runs_root() -> Path:
    """``$SEQGEN_CACHE/runs``: where default run directories live."""
    from ..models import cache_dir

    return cache_dir() / "runs"


def default_run_dir(fingerprint: JobFingerprint) -> Path:
    """The run directory of a job when ``--run-dir`` is not given: named by its fingerprint."""
    return runs_root() / fingerprint_digest(fingerprint)[:16]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` whole or not at all: to a file beside it, flushed to disk, then renamed."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


class RunDirectory:
    """One job's run directory, locked (one process at a time) from :meth:`start` or :meth:`resume` until
    :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock: Any = None
        self._digests: dict[str, str] = {}  # sha256 of the latest checkpoint's files

    # ---- opening -------------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, path: str | os.PathLike[str], fingerprint: JobFingerprint) -> RunDirectory:
        """The run directory for a new run of the job: ``path`` is created, or emptied when it holds a finished run.
        A directory that holds anything else, or an unfinished run (which ``--resume`` continues), is refused."""
        run = cls(Path(path))
        if run.path.exists() and not run.path.is_dir():
            raise SeqgenError(f"run directory {run.path} is a file; pass a directory path to --run-dir.")
        if run.path.is_dir() and any(run.path.iterdir()):
            if not (run.path / JOB).is_file():
                raise SeqgenError(
                    f"run directory {run.path} is not empty and holds no seqgen run ({JOB}), so it is not used. "
                    "Pass a new or empty directory to --run-dir."
                )
            run._acquire()
            manifest = run.manifest()
            if manifest is None or not manifest["finished"]:
                run.close()
                done = 0 if manifest is None else manifest["next_subgraph"]
                raise SeqgenError(
                    f"run directory {run.path} holds an unfinished run ({done} subgraphs done). Continue it with "
                    f"`--resume {run.path}`, or delete it (`rm -r {run.path}`) to start over."
                )
            run._remove_unlisted(())
            (run.path / MANIFEST).unlink()
        run.path.mkdir(parents=True, exist_ok=True)
        if run._lock is None:
            run._acquire()
        write_json(run.path / JOB, fingerprint)
        return run

    @classmethod
    def resume(cls, path: str | os.PathLike[str], fingerprint: JobFingerprint) -> RunDirectory:
        """The run directory of a killed run of this job, checked: the fingerprints must be equal (the fields that
        differ are named otherwise), and every file of the latest checkpoint must have its sha256."""
        run = cls(Path(path))
        if not (run.path / JOB).is_file():
            raise SeqgenError(
                f"{run.path} is not a run directory (it has no {JOB}); pass the directory that a calibration printed "
                "at its start."
            )
        run._acquire()
        try:
            stored = json.loads((run.path / JOB).read_text())
            changed = differences(stored, fingerprint)
            if changed:
                raise SeqgenError(
                    f"cannot resume {run.path}: the job differs from the run's in {'; '.join(changed)}. Run the same "
                    "command as the run that wrote it, or start over without --resume."
                )
            manifest = run.manifest()
            run._remove_unlisted(() if manifest is None else manifest["files"])
            if manifest is not None:
                run._verify(manifest["files"])
                run._digests = dict(manifest["files"])
        except BaseException:
            run.close()
            raise
        return run

    def _acquire(self) -> None:
        handle = open(self.path / _LOCK, "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SeqgenError(
                f"run directory {self.path} is in use by another seqgen process; wait for it, or pass another "
                "--run-dir."
            ) from None
        self._lock = handle

    def close(self) -> None:
        """Release the lock (the directory stays)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any] | None:
        """The latest complete checkpoint's manifest, or None before the first."""
        path = self.path / MANIFEST
        if not path.is_file():
            return None
        manifest = json.loads(path.read_text())
        if manifest.get("schema") != SCHEMA:
            raise SeqgenError(
                f"{path} was written by another seqgen version (schema {manifest.get('schema')}, this one reads "
                f"{SCHEMA}); delete {self.path} and start over."
            )
        return manifest

    def _verify(self, files: Mapping[str, str]) -> None:
        for name, digest in files.items():
            file = self.path / name
            if not file.is_file() or sha256_file(file) != digest:
                raise SeqgenError(
                    f"checkpoint file {file} is {'damaged' if file.is_file() else 'missing'} (its sha256 is not the "
                    f"manifest's), so {self.path} cannot be resumed; delete it and start over."
                )

    def commit(self, files: Iterable[str], state: Mapping[str, Any]) -> None:
        """Make ``files`` (relative paths, already written) and ``state`` the latest checkpoint: the manifest with
        their sha256 is written last, then what it no longer lists is deleted."""
        hashes = {name: self._digests.get(name) or sha256_file(self.path / name) for name in sorted(files)}
        write_json(self.path / MANIFEST, {"schema": SCHEMA, "finished": False, **state, "files": hashes})
        self._digests = hashes  # files are never rewritten: a later checkpoint that keeps one need not hash it again
        self._remove_unlisted(hashes)

    def abandon(self) -> None:
        """Delete the files of a checkpoint that failed to complete: the latest complete one stays as it was."""
        manifest = self.manifest()
        self._remove_unlisted(() if manifest is None else manifest["files"])

    def finish(self) -> None:
        """Mark the run finished (``seqgen cache prune`` then deletes it) and release the lock."""
        manifest = self.manifest()
        if manifest is not None:
            write_json(self.path / MANIFEST, {**manifest, "finished": True})
        self.close()

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def _remove_unlisted(self, listed: Iterable[str]) -> None:
        """Delete every file and directory but ``listed`` (relative paths) and the run's own files."""
        keep = set(listed) | _OWN
        parents = {parent.as_posix() for name in keep for parent in Path(name).parents}
        for path in sorted(self.path.iterdir()):
            name = path.name
            if name in keep:
                continue
            if name not in parents:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                continue
            for inner in path.rglob("*"):  # a directory the manifest lists files of: what it does not list goes
                if inner.is_file() and inner.relative_to(self.path).as_posix() not in keep:
                    inner.unlink()


def prune_runs(root: Path | None = None, *, older_than_days: float | None = None) -> list[Path]:
    """Delete finished run directories, unfinished ones unused for ``older_than_days``, and the debris of killed
    checkpoint writes in the others; runs in progress (locked) are left alone. Returns what was deleted."""
    root = runs_root() if root is None else root
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in sorted(root.iterdir()):
        if not (path / JOB).is_file():
            continue
        run = RunDirectory(path)
        try:
            run._acquire()
        except SeqgenError:
            continue
        try:
            manifest = run.manifest()
        except (SeqgenError, ValueError):
            manifest = {"finished": True}  # unreadable by this version: it cannot be resumed
        age_days = (time.time() - max(f.stat().st_mtime for f in path.iterdir())) / 86400
        if manifest is not None and manifest["finished"] or older_than_days is not None and age_days > older_than_days:
            shutil.rmtree(path)
            removed.append(path)
        else:
            run._remove_unlisted(() if manifest is None else manifest["files"])
        run.close()
    return removed
