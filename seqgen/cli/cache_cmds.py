"""``seqgen cache list|show|rm|prune``: the partition cache under $SEQGEN_CACHE/partitions."""

from __future__ import annotations

import time

import click

from .output import out


def _cache():  # noqa: ANN202 - imported lazily so `seqgen --help` stays fast
    from ..cache import PartitionCache

    return PartitionCache()


@click.group()
def cache() -> None:
    """Inspect and clean the partition cache ($SEQGEN_CACHE/partitions)."""


@cache.command("list")
def list_entries() -> None:
    """One line per cached package: digest, model class, subgraphs, size, last use."""
    store = _cache()
    entries = store.entries()
    if not entries:
        out(f"partition cache {store.root} is empty")
        return
    for e in entries:
        age = (time.time() - e.last_used) / 3600
        flag = "  (stale: other library versions)" if e.stale else ""
        out(
            f"{e.digest[:16]}  {e.model_class:<28} {e.subgraphs:>4} subgraphs  {e.size_bytes / 1024:8.1f} KiB  "
            f"used {age:6.1f} h ago{flag}"
        )


@cache.command()
@click.argument("digest")
@click.pass_context
def show(ctx: click.Context, digest: str) -> None:
    """Show the cached package whose fingerprint starts with DIGEST."""
    from .package_cmds import show as show_package

    ctx.invoke(show_package, package=_cache().find(digest).path)


@cache.command()
@click.argument("digest")
def rm(digest: str) -> None:
    """Remove the cached package whose fingerprint starts with DIGEST."""
    store = _cache()
    entry = store.find(digest)
    store.remove(entry)
    out(f"removed {entry.path}")


@cache.command()
@click.option(
    "--older-than",
    "older_than",
    type=float,
    default=None,
    metavar="DAYS",
    help="Also remove packages, and unfinished calibration runs, unused for this many days.",
)
def prune(older_than: float | None) -> None:
    """Remove packages of other library versions, old ones (--older-than) and leftovers of killed emits; finished
    calibration runs' directories ($SEQGEN_CACHE/runs), unfinished ones unused for --older-than days, and the debris
    of killed checkpoint writes."""
    from ..run import prune_runs

    removed = _cache().prune(older_than_days=older_than) + prune_runs(older_than_days=older_than)
    out(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}")
    for path in removed:
        out(f"  {path}")
