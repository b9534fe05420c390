"""Sequential calibration: one subgraph at a time, from a loaded package.

Per subgraph (see ``calibrate``):

1. onload exactly the modules its index entry lists (and prefetch the next subgraph's: disk reads, CUDA copies);
2. **calibration pass** over all batches with hooks on the linears to quantize; linears that read the same input
   tensor (q/k/v, gate/up) share one :class:`~seqgen.algorithms.Statistics`, so their Hessian is computed once.
   Its outputs are dropped, so after the first batch each batch stops at the last linear's input;
3. reduce statistics (the one place where processes would meet) and **compress** every linear (linears sharing
   statistics in one call when the algorithm allows): its weight becomes the dequantized quantized weight, and the
   :class:`~seqgen.algorithms.QuantizedWeight` is kept for saving;
4. **propagation pass** with hooks off, so the next subgraph sees quantized outputs (skipped with
   ``propagate_error=False``: then the calibration pass's outputs are kept and no second pass runs);
5. offload, and hand the subgraph's results to ``on_subgraph_done`` (streamed saving, checkpoints).

Subgraphs with nothing to quantize run once. The last quantized subgraph has no propagation pass and the subgraphs
after it do not run at all: their outputs (the logits) are not needed.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..algorithms import (
    ActivationObserver,
    Algorithm,
    QuantizedWeight,
    QuantScheme,
    Statistics,
    get_algorithm,
    quantize_rtn,
)
from ..checkpoint import SafetensorsWeights
from ..errors import SeqgenError
from ..package import Package, Subgraph
from .dispatch import Dispatcher, execution_device
from .experts import FusedExperts, expert_params, expert_weight, find_fused_experts, unsupported_experts
from .intermediates import IntermediatesCache, StopBatch
from .memory import release_free_memory, reuse_large_allocations

__all__ = [
    "CalibrationOptions",
    "CalibrationResult",
    "SubgraphReport",
    "calibrate",
    "quantizable_linears",
    "routing_linears",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationOptions:
    algorithm: str = "gptq"
    scheme: QuantScheme = QuantScheme()
    ignore: tuple[str, ...] = ()  # regexes over module names, in addition to lm_head
    propagate_error: bool = True
    observe: bool = False  # keep per-channel activation statistics of every quantized linear's input
    device: str | None = None  # default: cuda:0 when available, else cpu
    prefetch: bool = True  # next subgraph's weights: disk reads ahead (page cache); CUDA copies on a side stream
    quantize_experts: bool = True  # fused MoE experts (3D parameters), per expert
    all_experts: bool = False  # route every calibration token through every expert's statistics
    reuse_allocations: bool = True  # on the CPU: glibc keeps large freed buffers for reuse (see runtime.memory)
    spill_dir: str | Path | None = None  # activations between subgraphs wait in files here, not in RAM
    # fused MoE experts whose statistics are collected at once; more experts take more calibration passes over the
    # subgraph (None: all in one pass). Bounds the statistics' memory: e.g. DeepSeek-V3's 256 experts hold 57 GB of
    # fp32 Hessians at once, 64 per pass 14 GB.
    experts_per_pass: int | None = None


_PHASES = ("onload", "calibrate", "compress", "propagate", "offload")  # a subgraph's phases, in the order they run


@dataclass
class SubgraphReport:
    name: str
    linears: int
    seconds: dict[str, float]


@dataclass
class CalibrationResult:
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    experts: dict[str, QuantizedWeight] = field(default_factory=dict)  # "<module>.<param>.<expert>"
    activation_stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    reports: list[SubgraphReport] = field(default_factory=list)
    linears: int = 0  # quantized nn.Linear layers (also when the weights were streamed out, not kept)
    # linears in the targets whose forward never ran, and fused experts' parameters (<module>.<param>) likewise
    unquantized: list[str] = field(default_factory=list)
    round_to_nearest: list[str] = field(default_factory=list)  # experts no calibration token reached (no statistics)
    seconds: float = 0.0
    peak_device_bytes: int | None = None

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase, summed over the subgraphs, in the order the phases run (phases that never ran are
        left out)."""
        return {
            phase: sum(r.seconds[phase] for r in self.reports if phase in r.seconds)
            for phase in _PHASES
            if any(phase in r.seconds for r in self.reports)
        }

    def phase_summary(self) -> str:
        """``phase_seconds`` as one line, e.g. ``calibrate 70.9s, compress 8.0s, propagate 49.4s``."""
        return ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in self.phase_seconds().items())


def quantizable_linears(
    model: torch.nn.Module, subgraph: Subgraph, ignore: tuple[str, ...]
) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` inside the subgraph's targets, except ``lm_head``, MoE routing linears (see
    :func:`routing_linears`) and names matching ``ignore``."""
    patterns = [re.compile(p) for p in ignore]
    found: dict[str, torch.nn.Linear] = {}
    for target in subgraph.targets:
        root = model.get_submodule(target)
        routing = routing_linears(root)
        for name, module in root.named_modules():
            full = f"{target}.{name}" if name else target
            if not isinstance(module, torch.nn.Linear) or full.split(".")[-1] == "lm_head" or name in routing:
                continue
            if any(p.search(full) for p in patterns):
                continue
            found[full] = module
    return found


_SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")


def routing_linears(root: torch.nn.Module) -> set[str]:
    """The names (under ``root``) of the linears that route tokens in its MoE blocks: routers (one logit per expert)
    and shared-expert gates (one output), which stay in full precision as serving engines expect (vLLM builds them
    unquantized) and as routing accuracy needs. An MoE block is a module with an ``experts`` child; its experts and
    shared experts are not routing."""
    found: set[str] = set()
    for block_name, block in root.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, torch.nn.Module):
            continue
        if isinstance(experts, torch.nn.ModuleList):
            count = len(experts)
        else:
            fused = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
            count = fused[0].shape[0] if fused else None
        for name, module in block.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.split(".")[0] in ("experts", *_SHARED_EXPERT_NAMES):
                continue
            if module.out_features == 1 or module.out_features == count:
                found.add(f"{block_name}.{name}" if block_name else name)
    return found


class _Collector:
    """Forward pre-hooks that feed each linear's input to its (possibly shared) statistics.

    With ``stop_early`` (a pass whose outputs are dropped) a batch ends as soon as every linear has seen its input:
    the first batch runs whole and records which linear comes last; later batches raise :class:`StopBatch` in that
    linear's hook once all the others have fired, which skips e.g. the ``down_proj`` matmul and the residual add.
    """

    def __init__(
        self, algorithm: Algorithm, linears: Mapping[str, torch.nn.Linear], observe: bool, stop_early: bool = False
    ) -> None:
        self.algorithm = algorithm
        self.linears = linears
        self.observe = observe
        self.stop_early = stop_early
        self.stats: dict[str, Statistics | None] = {}
        self.observers: dict[str, ActivationObserver] = {}
        self.mask: torch.Tensor | None = None
        self._seen: list[tuple[torch.Tensor, Statistics | None]] = []  # this batch: input tensor -> statistics
        self._updated: set[int] = set()
        self._fired: dict[str, None] = {}  # linears whose hook ran in this batch, in order
        self._last: str | None = None  # the last linear of a complete batch
        self._handles: list[Any] = []

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = None if mask is None or bool(mask.all()) else mask  # no padding: no token selection (no copy)
        if self.stop_early and self._last is None and len(self._fired) == len(self.linears):
            self._last = next(reversed(self._fired))
        self._seen.clear()
        self._updated.clear()
        self._fired.clear()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
            return x[self.mask.to(x.device).bool()]
        return x.reshape(-1, x.shape[-1])

    def hook(self, name: str) -> Callable[..., None]:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if name not in self.stats:  # first batch: linears fed the same tensor share statistics
                shared = next((s for t, s in self._seen if t is x), None)
                if shared is None and not any(t is x for t, _ in self._seen):
                    shared = self.algorithm.new_statistics(module.in_features, x.device)
                    self._seen.append((x, shared))
                self.stats[name] = shared
            stats = self.stats[name]
            tokens = None
            if stats is not None and id(stats) not in self._updated:
                tokens = self._tokens(x)
                stats.update(tokens)
                self._updated.add(id(stats))
            if self.observe:
                observer = self.observers.setdefault(name, ActivationObserver(module.in_features, x.device))
                observer.update(self._tokens(x) if tokens is None else tokens)
            self._seen.append((x, stats))
            if name in self._fired:  # runs twice per batch: its later calls must not be skipped
                self.stop_early = False
            self._fired[name] = None
            if self.stop_early and name == self._last and len(self._fired) == len(self.linears):
                raise StopBatch

        return pre_hook

    def __enter__(self) -> _Collector:
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self.hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()


def calibrate(
    model: torch.nn.Module,
    package: Package,
    batches: list[Mapping[str, Any]],
    options: CalibrationOptions = CalibrationOptions(),
    *,
    weights: SafetensorsWeights | None = None,
    on_subgraph_done: Callable[[Subgraph, dict[str, QuantizedWeight], dict[str, QuantizedWeight]], None] | None = None,
    keep_results: bool = True,
) -> CalibrationResult:
    """Quantize ``model`` in place, subgraph by subgraph, on ``batches`` (dicts of the package's inputs).

    ``on_subgraph_done(subgraph, quantized, experts)`` runs while the subgraph's weights are still on the device
    (streamed saving), with its quantized linears and fused experts (keyed as in :class:`CalibrationResult`); with
    ``keep_results=False`` the quantized weights are not also kept in the result (disk offload).
    """
    if not batches:
        raise SeqgenError("calibration needs at least one batch; check --num-samples and the dataset.")
    if options.experts_per_pass is not None and options.experts_per_pass < 1:
        raise SeqgenError(f"experts_per_pass must be a positive number of experts, got {options.experts_per_pass}.")
    package.check_model(model)
    for batch in batches:
        package.check_batch(batch)
    device = execution_device(options.device)
    if device.type == "cpu" and options.reuse_allocations:
        reuse_large_allocations()
    algorithm = get_algorithm(options.algorithm, options.scheme)
    dispatcher = Dispatcher(model, device, weights)
    cache = IntermediatesCache(batches, device, options.spill_dir)
    plan = _once_each(
        [quantizable_linears(model, sg, options.ignore) for sg in package.subgraphs], from_disk=weights is not None
    )
    expert_plan = [_experts_of(model, sg, options) for sg in package.subgraphs]
    last = max((i for i, work in enumerate(zip(plan, expert_plan, strict=True)) if any(work)), default=-1)
    if last < 0:
        raise SeqgenError(
            f"no nn.Linear to quantize inside the targets of {package.path} (ignore patterns: "
            f"{options.ignore}); {_why_nothing_to_quantize(model, package)}"
        )
    _check_group_size(options.scheme, plan[: last + 1], expert_plan[: last + 1])
    needs_data = algorithm.new_statistics(1, torch.device("cpu")) is not None or options.observe
    result = CalibrationResult()
    warned: set[str] = set()  # kinds of linears reported as never run
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    subgraphs = package.subgraphs[: last + 1]
    dispatcher.check(subgraphs)
    with tqdm(total=len(subgraphs), desc="subgraphs", unit="sg") as outer, closing(cache):
        for i, subgraph in enumerate(subgraphs):
            linears = plan[i]
            experts = {
                name: FusedExperts(
                    name, module, algorithm, options.all_experts, parent=model.get_submodule(name.rpartition(".")[0])
                )
                for name, module in expert_plan[i].items()
            }
            next_subgraph = subgraphs[i + 1] if i + 1 < len(subgraphs) else None
            seconds: dict[str, float] = {}
            tick = time.perf_counter()
            dispatcher.onload(subgraph)
            if next_subgraph is not None and options.prefetch:
                dispatcher.prefetch(next_subgraph)
            seconds["onload"] = time.perf_counter() - tick
            done: dict[str, QuantizedWeight] = {}
            work = bool(linears or experts)
            expert_done: dict[str, QuantizedWeight] = {}
            calibration_pass = work and needs_data
            outputs_needed = i < last  # the last quantized subgraph's outputs feed nothing that runs
            commit_calibration = outputs_needed and not options.propagate_error
            propagation_pass = outputs_needed and (options.propagate_error or not calibration_pass)
            passes = _expert_passes(experts, options.experts_per_pass) if calibration_pass else []
            with tqdm(
                total=len(cache) * (len(passes) + propagation_pass), desc=subgraph.name, leave=False, unit="batch"
            ) as bar:
                if calibration_pass:
                    bar.set_description(f"{subgraph.name} calibrate")
                    tick = time.perf_counter()
                    # Routing can differ per batch, so with fused experts every batch runs whole.
                    collector = _Collector(
                        algorithm, linears, options.observe, stop_early=not commit_calibration and not experts
                    )
                    for index, active in enumerate(passes):
                        # later passes: only the next experts' statistics; the experts calibrated so far are
                        # compressed first, their weights written back after the last pass (every pass sees the
                        # model that a single pass would)
                        for fused in experts.values():
                            if index:
                                expert_done.update(_compress_experts(fused, result, defer=True))
                            fused.select(active)
                        with torch.no_grad(), collector if not index else nullcontext(), ExitStack() as stack:
                            for fused in experts.values():
                                stack.enter_context(fused)
                            cache.run(
                                model,
                                subgraph,
                                commit=commit_calibration and not index,
                                before_batch=(
                                    None if index else (lambda b: collector.new_batch(cache.attention_mask(b)))
                                ),
                                progress=lambda: bar.update(),
                            )
                    seconds["calibrate"] = time.perf_counter() - tick
                    bar.set_description(f"{subgraph.name} compress")
                    tick = time.perf_counter()
                    if weights is not None:  # disk offload: the pass's activations go back before GPTQ's peak
                        release_free_memory()
                    never, unrouted = _never_ran(linears, collector.stats)
                    if never:
                        _warn_never_ran(never, subgraph.targets, warned)
                        result.unquantized += never
                    if unrouted:
                        logger.warning(
                            "%s (and %d more experts) received no calibration tokens and are quantized "
                            "round-to-nearest (no statistics); add samples to give them data.",
                            unrouted[0],
                            len(unrouted) - 1,
                        )
                        result.round_to_nearest += unrouted
                    linears = {name: m for name, m in linears.items() if name not in never}
                    done = _compress(
                        algorithm, {n: m for n, m in linears.items() if n not in unrouted}, collector.stats
                    )
                    done.update(_round_to_nearest(options.scheme, {n: linears[n] for n in unrouted}))
                    for name, observer in collector.observers.items():
                        observer.reduce_()
                        result.activation_stats[name] = observer.summary()
                    del collector
                    seconds["compress"] = time.perf_counter() - tick
                elif work:
                    done = _compress(algorithm, linears, {name: None for name in linears})
                for fused in experts.values():
                    expert_done.update(_compress_experts(fused, result))
                    if fused.never_ran:
                        _warn_never_ran([fused.name], subgraph.targets, warned)
                        result.unquantized += [f"{fused.name}.{param}" for param in fused.params]
                    fused.write_back()
                experts.clear()
                if propagation_pass:
                    bar.set_description(f"{subgraph.name} propagate")
                    tick = time.perf_counter()
                    with torch.no_grad():
                        cache.run(model, subgraph, commit=True, progress=lambda: bar.update())
                    seconds["propagate"] = time.perf_counter() - tick
            tick = time.perf_counter()
            if on_subgraph_done is not None:
                on_subgraph_done(subgraph, done, expert_done)
            changed = [f"{name}.weight" for name in done]
            changed += [f"{name}.{param}" for name, module in expert_plan[i].items() for param in expert_params(module)]
            dispatcher.offload(subgraph, changed=changed)
            if weights is not None:  # disk offload: the subgraph's weights and buffers go back to the OS
                release_free_memory()
            seconds["offload"] = time.perf_counter() - tick
            if keep_results:
                result.quantized.update(done)
                result.experts.update(expert_done)
            result.linears += len(done)
            del done, expert_done  # streamed out (disk offload): not kept through the next subgraph
            result.reports.append(SubgraphReport(subgraph.name, len(linears), seconds))
            outer.update()
    result.seconds = time.perf_counter() - start
    if device.type == "cuda":
        result.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    logger.info(
        "calibrated %d linears and %d expert projections in %d subgraphs in %.1fs (%s)",
        result.linears,
        len(result.experts),
        len(subgraphs),
        result.seconds,
        result.phase_summary(),
    )
    return result


def _expert_passes(experts: Mapping[str, FusedExperts], per_pass: int | None) -> list[range]:
    """The experts each calibration pass collects statistics for: all in one pass, or ``per_pass`` at a time."""
    count = max((fused.num_experts for fused in experts.values()), default=0)
    if per_pass is None or per_pass >= count:
        return [range(count)]
    return [range(start, min(start + per_pass, count)) for start in range(0, count, per_pass)]


def _compress_experts(
    fused: FusedExperts, result: CalibrationResult, defer: bool = False
) -> dict[str, QuantizedWeight]:
    done = fused.compress(defer)
    result.round_to_nearest += [f"{fused.name}.{param}.{e}" for param in fused.params for e in fused.unrouted]
    return done


def _once_each(plan: list[dict[str, torch.nn.Linear]], from_disk: bool) -> list[dict[str, torch.nn.Linear]]:
    """``plan`` with each weight kept at its first linear only. A weight that several targets share (Zamba ties one
    transformer block into several layers) is quantized once, with the statistics of its first use; later targets
    run it quantized. With weights read from disk a later target would read the unquantized weight again, so shared
    weights are refused there."""
    seen: dict[int, str] = {}
    kept = []
    for linears in plan:
        kept.append({})
        for name, module in linears.items():
            if id(module.weight) in seen:
                if from_disk:
                    raise SeqgenError(
                        f"{name} holds the same weight as {seen[id(module.weight)]} (layers that share a block); "
                        "disk offload would read it unquantized for the later layer. Use memory offload (the "
                        "default), or leave the shared block unquantized (--ignore a pattern that matches all its "
                        "names)."
                    )
                logger.debug("%s holds the weight of %s, quantized there", name, seen[id(module.weight)])
                continue
            seen[id(module.weight)] = name
            kept[-1][name] = module
    shared = sum(map(len, plan)) - sum(map(len, kept))
    if shared:
        logger.info("%d linears are shared between targets; each is quantized at its first use", shared)
    return kept


def _never_ran(
    linears: Mapping[str, torch.nn.Linear], stats: Mapping[str, Statistics | None]
) -> tuple[list[str], list[str]]:
    """The linears whose forward never ran in the calibration pass, in two lists. Most stay unquantized (a compressed
    save lists them in ``ignore``): a branch these inputs never take (cross-attention without encoder states) or
    model code that reads the weight itself (Mamba's ``dt_proj``), where a quantized weight would not be what runs.
    Experts (``...experts.<e>...``) that no token reached are the second list: they are quantized round-to-nearest,
    since a layer of quantized and unquantized experts is one that serving engines cannot load."""
    never = [name for name in linears if name not in stats]
    unrouted = [name for name in never if re.search(r"\.experts?\.\d+\.", name)]
    return [name for name in never if name not in unrouted], unrouted


@torch.no_grad()
def _round_to_nearest(scheme: QuantScheme, linears: Mapping[str, torch.nn.Linear]) -> dict[str, QuantizedWeight]:
    """Quantize ``linears`` without statistics, in the calibration's scheme, and write back the dequantized weights."""
    done = {}
    for name, module in linears.items():
        quantized = quantize_rtn(module.weight.data, scheme)
        module.weight.data.copy_(quantized.dequantize(module.weight.dtype))
        done[name] = quantized.to("cpu")
    return done


def _warn_never_ran(never: list[str], targets: tuple[str, ...], warned: set[str]) -> None:
    """One warning per linear of a target (its name inside the target) that never ran, at its first subgraph."""
    inner = sorted({next((name[len(t) + 1 :] for t in targets if name.startswith(f"{t}.")), name) for name in never})
    if set(inner) <= warned:
        return
    warned.update(inner)
    pattern = "|".join(re.escape(name) for name in inner)
    logger.warning(
        "%s never ran during the calibration pass: %s unquantized, here and in every target where %s not run (see "
        "CalibrationResult.unquantized). A branch these inputs do not take, or model code that reads the weight "
        "directly. Pass --ignore '\\.(%s)$' to leave them out knowingly.",
        ", ".join(never),
        "it stays" if len(never) == 1 else "they stay",
        "it does" if len(never) == 1 else "they do",
        pattern,
    )


def _why_nothing_to_quantize(model: torch.nn.Module, package: Package) -> str:
    """The fix for a calibration with nothing to quantize: other --ignore or --targets, unless the targets hold their
    projections in module types that are not ``nn.Linear`` (GPT-2's ``Conv1D``), which are not quantized."""
    kinds = sorted(
        {
            type(m).__name__
            for target in {t for sg in package.subgraphs for t in sg.targets}
            for m in model.get_submodule(target).modules()
            if not isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
            and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2
        }
    )
    if kinds:
        return (
            f"the targets compute their projections with {', '.join(kinds)}, which seqgen does not quantize "
            "(only nn.Linear and fused MoE experts)."
        )
    return "check --ignore, or emit with other --targets."


def _check_group_size(
    scheme: QuantScheme, plan: list[dict[str, torch.nn.Linear]], expert_plan: list[dict[str, torch.nn.Module]]
) -> None:
    """Refuse, before any calibration, a group size that does not divide the input width of every weight to quantize
    (otherwise the first such layer would fail after its subgraph's calibration pass)."""
    if scheme.group_size is None:
        return
    widths: dict[str, tuple[int, str]] = {}  # weight -> (in_features, the module name's end, for --ignore)
    for linears in plan:
        widths.update({name: (module.in_features, name.rsplit(".", 1)[-1]) for name, module in linears.items()})
    for experts in expert_plan:  # ignore patterns match the experts module, not its parameters
        for name, module in experts.items():
            leaf = name.rsplit(".", 1)[-1]
            for param in expert_params(module):
                widths[f"{name}.{param}"] = (expert_weight(module, param, 0).shape[1], leaf)
    misfits: dict[int, list[str]] = {}
    for name, (width, _) in widths.items():
        if width % scheme.group_size:
            misfits.setdefault(width, []).append(name)
    if not misfits:
        return
    lines = []
    for width, names in sorted(misfits.items()):
        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
        lines.append(f"  in_features {width}: {', '.join(names[:2])}{more}")
    leaves = sorted({widths[name][1] for names in misfits.values() for name in names})
    common = math.gcd(*(width for width, _ in widths.values()))
    sizes = [g for g in (128, 64, 32, 16) if common % g == 0]
    size_hint = f"--group-size {sizes[0]} (divides every width), " if sizes else ""
    raise SeqgenError(
        f"group size {scheme.group_size} does not divide the input width of {sum(map(len, misfits.values()))} of "
        f"the {len(widths)} weights to quantize:\n" + "\n".join(lines) + "\n"
        f"Use {size_hint}--group-size -1 (one scale per output channel), or leave them unquantized with "
        + (f"--ignore '{leaves[0]}$'" if len(leaves) == 1 else f"--ignore '\\.({'|'.join(leaves)})$'")
        + "."
    )


def _experts_of(model: torch.nn.Module, subgraph: Subgraph, options: CalibrationOptions) -> dict[str, torch.nn.Module]:
    if not options.quantize_experts:
        return {}
    found: dict[str, torch.nn.Module] = {}
    for target in subgraph.targets:
        module = model.get_submodule(target)
        for name in unsupported_experts(module, target):
            logger.warning("%s: fused experts of an unsupported layout are left unquantized", name)
        found.update(
            {
                n: m
                for n, m in find_fused_experts(module, target).items()
                if not any(re.search(p, n) for p in options.ignore)
            }
        )
    return found


@torch.no_grad()
def _compress(
    algorithm: Algorithm, linears: Mapping[str, torch.nn.Linear], stats: Mapping[str, Statistics | None]
) -> dict[str, QuantizedWeight]:
    """Quantize every linear and write its dequantized weight back.

    Linears that share statistics (q/k/v, gate/up) are quantized in one call on their row-stacked weights when the
    algorithm is ``row_separable``: the same result per linear, one GPTQ factorization and column loop instead of
    three.
    """
    groups: dict[int, list[str]] = {}
    for name in linears:
        shared = stats[name]
        key = id(shared) if shared is not None and algorithm.row_separable else id(linears[name])
        groups.setdefault(key, []).append(name)
    # Statistics read by one quantize call may be freed inside it; any statistics are freed after their last one.
    uses: dict[int, int] = {}
    for names in groups.values():
        if stats[names[0]] is not None:
            uses[id(stats[names[0]])] = uses.get(id(stats[names[0]]), 0) + 1
    for shared in {id(s): s for s in stats.values() if s is not None}.values():
        shared.reduce_()
        shared.single_use = uses.get(id(shared)) == 1
    done: dict[str, QuantizedWeight] = {}
    for names in groups.values():
        weights = [linears[name].weight.data for name in names]
        stacked = weights[0] if len(weights) == 1 else torch.cat([w.to(weights[0].dtype) for w in weights])
        shared = stats[names[0]]
        quantized = algorithm.quantize(stacked, shared)
        if shared is not None:
            uses[id(shared)] -= 1
            if not uses[id(shared)]:
                shared.release()
        for name, part in zip(names, _split_rows(quantized, [w.shape[0] for w in weights]), strict=True):
            module = linears[name]
            module.weight.data.copy_(part.dequantize(module.weight.dtype))
            done[name] = part.to("cpu")
    return {name: done[name] for name in linears}


def _split_rows(quantized: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """The per-linear pieces of a row-stacked quantized weight (``g_idx`` is per column, so it is shared)."""
    if len(rows) == 1:
        return [quantized]
    codes = quantized.codes.split(rows)
    scales = quantized.scale.split(rows)
    zeros = [None] * len(rows) if quantized.zero_point is None else quantized.zero_point.split(rows)
    return [
        QuantizedWeight(
            codes=c.contiguous(),
            scale=s.contiguous(),
            zero_point=None if z is None else z.contiguous(),
            g_idx=quantized.g_idx,
            scheme=quantized.scheme,
        )
        for c, s, z in zip(codes, scales, zeros, strict=True)
    ]
