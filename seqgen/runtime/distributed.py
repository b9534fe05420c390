"""Data-parallel calibration on torch.distributed: one process per device (``torchrun``), each with its share of the
calibration batches, the same model, package and quantized weights.

What each rank does, per subgraph (the steps of :mod:`seqgen.runtime.steps`, with three hooks from here):

* **calibration pass** over its own batches; afterwards :func:`align_statistics` gives every rank statistics for the
  same linears and experts, in the same order (a rank whose batches never reached a linear gets empty ones);
* **reduce** (:func:`seqgen.runtime.steps.reduce_statistics`): each statistics object all-reduces its sums and
  token counts (GPTQ's raw ``X^T X`` and token count; observers' min, max and token-weighted means);
* **compress** (:func:`compress_owned`): each group of linears that share statistics has one owner rank, chosen by
  bin-packing on GPTQ's work (largest first, onto the least loaded rank); the owner quantizes it and broadcasts the
  codes and scales, and every rank writes the same dequantized weights back, so every rank propagates alike. Fused
  MoE experts are compressed by every rank from the all-reduced statistics (the same result everywhere, no scaling).

The batches are split at batch boundaries (:func:`share`): of ``B`` batches rank ``r`` of ``W`` takes batches
``floor(r B / W)`` to ``floor((r + 1) B / W) - 1``, so each sample sits in the batch it has in one process.
Rank 0 emits the package (the others wait, then find it in the cache) and writes the checkpoint.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..algorithms import ActivationObserver, Algorithm, QuantizedWeight, Statistics
from ..algorithms.base import distributed_active
from ..errors import SeqgenError
from .compress import compress_linears

if TYPE_CHECKING:
    from .state import SubgraphState

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Ranks",
    "align_statistics",
    "assign_owners",
    "compress_owned",
    "distributed_rank",
    "join_process_group",
    "launch",
    "launched_by_torchrun",
    "local_batches",
    "main_first",
    "report_failure",
    "share",
    "synchronize",
]

logger = logging.getLogger(__name__)

#: How long a rank waits in a collective for the others before it stops with an error (a rank that died or hangs).
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world``, calibrating on ``device`` (None: the default)."""

    rank: int = 0
    world: int = 1
    device: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_rank() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside a process group."""
    if not distributed_active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def launched_by_torchrun() -> bool:
    """Whether this process is one of the workers that torchrun (torch.distributed.run) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def join_process_group(device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Under torchrun, join the job's process group (nccl on CUDA, gloo on the CPU; left at exit) and return this
    rank with its device: ``cuda:<LOCAL_RANK>`` unless ``device`` names one, the CPU for ``device="cpu"``. Outside
    torchrun (or already joined) nothing changes. Ranks after the first show no progress bars."""
    if distributed_active() or not launched_by_torchrun():
        rank, world = distributed_rank()
        return Ranks(rank, world, device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if on_cuda and (device is None or device == "cuda"):
        device = f"cuda:{local}"
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    atexit.register(_leave)
    rank, world = distributed_rank()
    if rank:  # tqdm reads TQDM_DISABLE when it is imported, long before this: its bars are turned off here
        import tqdm

        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)  # type: ignore[method-assign]
    logger.info("rank %d of %d on %s (%s)", rank, world, device or "cpu", dist.get_backend())
    return Ranks(rank, world, device)


def _leave() -> None:
    if distributed_active():
        dist.destroy_process_group()


def launch(nproc: int, argv: Sequence[str]) -> None:
    """Run ``python -m seqgen ARGV`` in ``nproc`` processes on this machine under torchrun (a standalone
    rendezvous); ``--nproc`` is taken out of ``argv``. A failed worker raises :class:`SeqgenError`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--nproc":
            del args[i : i + 2]
            break
        if arg.startswith("--nproc="):
            del args[i]
            break
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", "seqgen", *args])
    except ChildFailedError as exc:
        failures = ", ".join(f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(exc.failures.items()))
        raise SeqgenError(
            f"calibration on {nproc} processes failed: {failures}; the rank's own error is printed above."
        ) from None


def share(count: int, rank: int, world: int) -> range:
    """The indices of ``count`` items (batches) that rank ``rank`` of ``world`` takes: a contiguous run, the runs
    disjoint and covering all items, their lengths differing by at most one."""
    return range(rank * count // world, (rank + 1) * count // world)


def local_batches(batches: list[Any]) -> list[Any]:
    """This rank's share of ``batches`` (all of them outside a process group)."""
    rank, world = distributed_rank()
    if world == 1:
        return batches
    if len(batches) < world:
        raise SeqgenError(
            f"{len(batches)} calibration batches cannot be shared by {world} ranks (each needs one); lower "
            "--batch-size or raise --num-samples."
        )
    return [batches[i] for i in share(len(batches), rank, world)]


def synchronize() -> None:
    """Wait for every rank (a no-op in one process). On gloo a monitored barrier names the ranks that did not come."""
    if not distributed_active():
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(wait_all_ranks=True)
    else:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (emits the package into the cache); the others run it once it is done (and find
    the package there)."""
    rank, _ = distributed_rank()
    if rank:
        synchronize()
    yield
    if not rank:
        synchronize()


@contextmanager
def report_failure(subgraph: str) -> Iterator[None]:
    """Under torch.distributed, an error in the block names this rank and ``subgraph``. The other ranks stop at
    their next collective: at once when this process exits, else after the process group's timeout."""
    try:
        yield
    except Exception as exc:
        rank, world = distributed_rank()
        if world == 1:
            raise
        logger.debug("rank %d failed in %s", rank, subgraph, exc_info=True)
        raise SeqgenError(f"rank {rank} of {world} stopped in subgraph {subgraph}: {exc}") from exc


def _gather(local: Any) -> list[Any]:
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return everyone


def align_statistics(sub: SubgraphState, algorithm: Algorithm) -> None:
    """After a calibration pass, give every rank statistics for the same linears and experts, in the same order: a
    linear (an expert) that ran on any rank gets empty statistics where it did not. Experts' routed-token counts of
    the pass are summed here too, so every rank sees the same experts as unrouted. A no-op in one process."""
    if not distributed_active():
        return
    collector = sub.collector if sub.passes_done == 1 else None
    local = {
        "groups": [] if collector is None else _sharing(collector.stats),
        "observed": [] if collector is None else list(collector.observers),
        "experts": [name for name, fused in sub.experts.items() if fused.gate_up_stats],
    }
    everyone = _gather(local)
    if collector is not None:
        _align_linears(collector, sub.linears, algorithm, [theirs["groups"] for theirs in everyone])
        observed = {name for theirs in everyone for name in theirs["observed"]}
        for name in observed - set(collector.observers):
            module = sub.linears[name]
            collector.observers[name] = ActivationObserver(module.in_features, module.weight.device)
        collector.observers = {name: collector.observers[name] for name in sub.linears if name in observed}
    ran = {name for theirs in everyone for name in theirs["experts"]}
    for name, fused in sub.experts.items():
        if name in ran:
            fused._ensure_stats(getattr(fused.module, fused.params[0]).device)
        counts = fused.routed[fused.active.start : fused.active.stop].clone()
        dist.all_reduce(counts)
        fused.routed[fused.active.start : fused.active.stop] = counts


def _sharing(stats: Mapping[str, Statistics | None]) -> list[tuple[tuple[str, ...], bool]]:
    """The linears that share each statistics object (names in order), and whether it is one (not None)."""
    groups: dict[tuple[str, object], list[str]] = {}
    for name, shared in stats.items():
        groups.setdefault(("shared", id(shared)) if shared is not None else ("alone", name), []).append(name)
    return [(tuple(names), stats[names[0]] is not None) for names in groups.values()]


def _align_linears(collector: Any, linears: Mapping[str, torch.nn.Linear], algorithm: Algorithm, groups: list) -> None:
    """Statistics for every group of linears that ran on any rank (the first rank's grouping where they differ);
    ``collector.stats`` in the plan's order afterwards."""
    for theirs in groups:
        for names, has_stats in theirs:
            present = [name for name in names if name in collector.stats]
            if present and len(present) != len(names):
                raise SeqgenError(
                    f"the ranks disagree on which linears share statistics ({', '.join(names)}); run the ranks with "
                    "the same model code."
                )
            if not present:
                module = linears[names[0]]
                shared = algorithm.new_statistics(module.in_features, module.weight.device) if has_stats else None
                collector.stats.update({name: shared for name in names})
    collector.stats = {name: collector.stats[name] for name in linears if name in collector.stats}


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """The rank that does each job of ``costs``: largest first, each onto the least loaded rank (ties: the lowest
    index, the lowest rank), the same on every rank."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[job] = rank
        load[rank] += costs[job]
    return owners


def _gptq_work(linears: Sequence[torch.nn.Linear]) -> float:
    """GPTQ's FLOPs for linears that share one Hessian, up to a constant: factoring it (cols^3) and the column
    loop's updates (rows x cols^2)."""
    cols = linears[0].in_features
    return float(cols) ** 2 * (cols + sum(module.out_features for module in linears))


@torch.no_grad()
def compress_owned(
    algorithm: Algorithm, linears: Mapping[str, torch.nn.Linear], stats: Mapping[str, Statistics | None]
) -> dict[str, QuantizedWeight]:
    """:func:`~seqgen.runtime.compress.compress_linears` split over the ranks: each group of linears sharing
    statistics is quantized by its owner (:func:`assign_owners` on GPTQ's work), then every quantized weight is
    broadcast from its owner and written back on the other ranks. The same result as one process on reduced
    statistics; in one process just ``compress_linears``."""
    rank, world = distributed_rank()
    if world == 1:
        return compress_linears(algorithm, linears, stats)
    groups = [names for names, _ in _sharing({name: stats[name] for name in linears})]
    owners = assign_owners([_gptq_work([linears[name] for name in names]) for names in groups], world)
    owner = {name: o for names, o in zip(groups, owners, strict=True) for name in names}
    mine = compress_linears(algorithm, {name: m for name, m in linears.items() if owner[name] == rank}, stats)
    for names, o in zip(groups, owners, strict=True):
        shared = stats[names[0]]
        if o != rank and shared is not None:
            shared.release()  # reduced for nothing on this rank (all-reduce is one collective, not one per owner)
    layouts: dict[str, Any] = {}
    for theirs in _gather({name: _layout(q) for name, q in mine.items()}):
        layouts.update(theirs)
    done = {}
    for name, module in linears.items():
        quantized = _broadcast(mine.get(name), layouts[name], owner[name])
        if owner[name] != rank:
            module.weight.data.copy_(quantized.dequantize(module.weight.dtype).to(module.weight.device))
        done[name] = quantized.to("cpu")
    return done


_FIELDS = ("codes", "scale", "zero_point", "g_idx")


def _layout(quantized: QuantizedWeight) -> dict[str, Any]:
    """What a rank needs to receive ``quantized``: each tensor's shape and dtype (None where absent), the scheme."""
    fields = {key: None if (t := getattr(quantized, key)) is None else (tuple(t.shape), t.dtype) for key in _FIELDS}
    return {**fields, "scheme": quantized.scheme}


def _broadcast(quantized: QuantizedWeight | None, layout: dict[str, Any], src: int) -> QuantizedWeight:
    """``quantized`` from rank ``src`` (None elsewhere) on every rank, via the backend's device."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensors: dict[str, torch.Tensor | None] = {}
    for key in _FIELDS:
        if layout[key] is None:
            tensors[key] = None
            continue
        shape, dtype = layout[key]
        t = (
            getattr(quantized, key).to(device)
            if quantized is not None
            else torch.empty(shape, dtype=dtype, device=device)
        )
        dist.broadcast(t, src)
        tensors[key] = t
    return QuantizedWeight(scheme=layout["scheme"], **tensors)
