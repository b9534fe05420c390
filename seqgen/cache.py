"""The partition cache: one package per fingerprint, emitted once, reused by every later run.

Layout: ``$SEQGEN_CACHE/partitions/<digest[:16]>/`` is an ordinary package directory. A lookup computes the
fingerprint of the model *without tracing* (config, modeling source, versions, options, input signature) and loads
the package if it exists. On a miss, the package is emitted under an exclusive file lock, to a temp directory that is
renamed into place, so two concurrent runs produce one intact package and a killed emit leaves only a temp directory
that ``prune`` removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import SeqgenError
from .index import INDEX_NAME, compute_fingerprint, current_versions, input_signature, parse_index
from .outputs import check_writable
from .package import Package, load

__all__ = ["CacheEntry", "PartitionCache", "expected_fingerprint"]

logger = logging.getLogger(__name__)

_DIGEST_CHARS = 16
_STALE_TEMP_SECONDS = 3600.0


def expected_fingerprint(model: torch.nn.Module, options: Any) -> dict[str, Any]:
    """The fingerprint a package emitted for ``model`` with ``options`` (an ``EmitOptions``) will have."""
    from .trace.leaves import resolve_leaf_functions

    leaves = resolve_leaf_functions(model, list(options.ignore))
    return compute_fingerprint(
        model,
        options=options.fingerprint_fields(),
        inputs=input_signature(options.inputs()),
        source_modules=sorted({fn.__module__ for fn in leaves}),
    )


@dataclass(frozen=True)
class CacheEntry:
    digest: str
    path: Path
    model_class: str
    versions: dict[str, str]
    subgraphs: int
    size_bytes: int
    last_used: float

    @property
    def stale(self) -> bool:
        """Emitted by other library versions: it can never be hit again by this installation."""
        return self.versions != current_versions()


class PartitionCache:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        if root is None:
            from .models import cache_dir

            root = cache_dir() / "partitions"
        self.root = Path(root)

    def path_for(self, digest: str) -> Path:
        return self.root / digest[:_DIGEST_CHARS]

    @contextmanager
    def _lock(self, digest: str) -> Iterator[None]:
        check_writable(self.root, f"the partition cache {self.root} ($SEQGEN_CACHE/partitions)")
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{digest[:_DIGEST_CHARS]}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def lookup(self, digest: str) -> Package | None:
        path = self.path_for(digest)
        if not (path / INDEX_NAME).exists():
            return None
        package = load(path)
        if package.fingerprint != digest:
            raise SeqgenError(
                f"cache entry {path} holds fingerprint {package.fingerprint[:16]}, not {digest[:16]}; "
                f"remove it with `seqgen cache rm {digest[:_DIGEST_CHARS]}`."
            )
        with contextlib.suppress(OSError):  # a read-only cache still serves its packages
            os.utime(path)
        return package

    def get_or_emit(self, model: torch.nn.Module, options: Any, *, reemit: bool = False) -> tuple[Package, bool]:
        """The package for ``model`` (on the meta device is best) and whether it came from the cache."""
        digest = expected_fingerprint(model, options)["digest"]
        path = self.path_for(digest)
        if not reemit:
            package = self.lookup(digest)
            if package is not None:
                logger.info("partition cache hit: %s", path)
                return package, True
        with self._lock(digest):
            if not reemit:  # another process may have emitted it while we waited for the lock
                package = self.lookup(digest)
                if package is not None:
                    logger.info("partition cache hit: %s", path)
                    return package, True
            from .emitter import emit_model

            logger.info("partition cache miss: emitting %s", path)
            result = emit_model(model, path, options, force=True)
            if result.index["fingerprint"]["digest"] != digest:
                raise SeqgenError(
                    "the emitted package's fingerprint differs from the one computed before tracing; this is a "
                    f"seqgen bug, please report it ({digest[:16]} vs {result.index['fingerprint']['digest'][:16]})."
                )
            return load(path), False

    def entries(self) -> list[CacheEntry]:
        found = []
        if not self.root.is_dir():
            return found
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not (path / INDEX_NAME).is_file():
                continue
            try:
                index = parse_index((path / INDEX_NAME).read_text(encoding="utf-8"), str(path / INDEX_NAME))
            except SeqgenError as exc:
                logger.warning("skipping damaged cache entry %s: %s", path, exc)
                continue
            found.append(
                CacheEntry(
                    digest=index["fingerprint"]["digest"],
                    path=path,
                    model_class=index["model_class"],
                    versions=index["versions"],
                    subgraphs=len(index["subgraphs"]),
                    size_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
                    last_used=path.stat().st_mtime,
                )
            )
        return found

    def find(self, prefix: str) -> CacheEntry:
        if not prefix.strip():  # "" is a prefix of every digest
            raise SeqgenError(
                "an empty digest prefix names no cache entry (it would match every one); pass the first characters "
                "of a digest that `seqgen cache list` shows."
            )
        matches = [e for e in self.entries() if e.digest.startswith(prefix)]
        if len(matches) != 1:
            what = "no entry" if not matches else f"{len(matches)} entries"
            raise SeqgenError(
                f"{what} of the partition cache {self.root} match {prefix!r}; `seqgen cache list` shows them."
            )
        return matches[0]

    def remove(self, entry: CacheEntry) -> None:
        with self._lock(entry.digest):
            shutil.rmtree(entry.path)
        (self.root / f".{entry.digest[:_DIGEST_CHARS]}.lock").unlink(missing_ok=True)

    def prune(self, *, older_than_days: float | None = None, stale: bool = True) -> list[Path]:
        """Remove stale-version entries, entries unused for ``older_than_days``, and leftovers of killed emits."""
        removed: list[Path] = []
        now = time.time()
        for entry in self.entries():
            too_old = older_than_days is not None and now - entry.last_used > older_than_days * 86400
            if (stale and entry.stale) or too_old:
                self.remove(entry)
                removed.append(entry.path)
        if self.root.is_dir():
            for path in sorted(self.root.glob(".*.tmp-*")):
                if now - path.stat().st_mtime > _STALE_TEMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed
