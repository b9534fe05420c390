"""Sequential calibration: one subgraph at a time, from a loaded package.

Per subgraph (see ``calibrate``):

1. onload exactly the modules its index entry lists (and prefetch the next subgraph's on CUDA);
2. **calibration pass** over all batches with hooks on the linears to quantize; linears that read the same input
   tensor (q/k/v, gate/up) share one :class:`~seqgen.algorithms.Statistics`, so their Hessian is computed once;
3. reduce statistics (the one place where processes would meet) and **compress** every linear: its weight becomes the
   dequantized quantized weight, and the :class:`~seqgen.algorithms.QuantizedWeight` is kept for saving;
4. **propagation pass** with hooks off, so the next subgraph sees quantized outputs (skipped with
   ``propagate_error=False``: then the calibration pass's outputs are kept and no second pass runs);
5. offload, and hand the subgraph's results to ``on_subgraph_done`` (streamed saving, checkpoints).

Subgraphs with nothing to quantize run once; subgraphs after the last quantized one do not run at all (their outputs,
the logits, are not needed).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..algorithms import ActivationObserver, Algorithm, QuantizedWeight, QuantScheme, Statistics, get_algorithm
from ..errors import SeqgenError
from ..package import Package, Subgraph
from .dispatch import Dispatcher, SafetensorsWeights, execution_device
from .experts import FusedExperts, find_fused_experts, unsupported_experts
from .intermediates import IntermediatesCache

__all__ = ["CalibrationOptions", "CalibrationResult", "SubgraphReport", "calibrate", "quantizable_linears"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationOptions:
    algorithm: str = "gptq"
    scheme: QuantScheme = QuantScheme()
    ignore: tuple[str, ...] = ()  # regexes over module names, in addition to lm_head
    propagate_error: bool = True
    observe: bool = False  # keep per-channel activation statistics of every quantized linear's input
    device: str | None = None  # default: cuda:0 when available, else cpu
    quantize_experts: bool = True  # fused MoE experts (3D parameters), per expert
    all_experts: bool = False  # route every calibration token through every expert's statistics


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
    seconds: float = 0.0
    peak_device_bytes: int | None = None


def quantizable_linears(model: torch.nn.Module, subgraph: Subgraph, ignore: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` inside the subgraph's targets, except ``lm_head`` and names matching ``ignore``."""
    patterns = [re.compile(p) for p in ignore]
    found: dict[str, torch.nn.Linear] = {}
    for target in subgraph.targets:
        for name, module in model.get_submodule(target).named_modules():
            full = f"{target}.{name}" if name else target
            if not isinstance(module, torch.nn.Linear) or full.split(".")[-1] == "lm_head":
                continue
            if any(p.search(full) for p in patterns):
                continue
            found[full] = module
    return found


class _Collector:
    """Forward pre-hooks that feed each linear's input to its (possibly shared) statistics."""

    def __init__(self, algorithm: Algorithm, linears: Mapping[str, torch.nn.Linear], observe: bool) -> None:
        self.algorithm = algorithm
        self.linears = linears
        self.observe = observe
        self.stats: dict[str, Statistics | None] = {}
        self.observers: dict[str, ActivationObserver] = {}
        self.mask: torch.Tensor | None = None
        self._seen: list[tuple[torch.Tensor, Statistics | None]] = []  # this batch: input tensor -> statistics
        self._updated: set[int] = set()
        self._handles: list[Any] = []

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = None if mask is None or bool(mask.all()) else mask  # no padding: no token selection (no copy)
        self._seen.clear()
        self._updated.clear()

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
    on_subgraph_done: Callable[[Subgraph, dict[str, QuantizedWeight]], None] | None = None,
    keep_results: bool = True,
) -> CalibrationResult:
    """Quantize ``model`` in place, subgraph by subgraph, on ``batches`` (dicts of the package's inputs).

    ``on_subgraph_done(subgraph, quantized)`` runs while the subgraph's weights are still on the device (streamed
    saving); with ``keep_results=False`` the quantized weights are not also kept in the result (disk offload).
    """
    if not batches:
        raise SeqgenError("calibration needs at least one batch; check --num-samples and the dataset.")
    package.check_model(model)
    for batch in batches:
        package.check_batch(batch)
    device = execution_device(options.device)
    algorithm = get_algorithm(options.algorithm, options.scheme)
    dispatcher = Dispatcher(model, device, weights)
    cache = IntermediatesCache(batches, device)
    plan = [quantizable_linears(model, sg, options.ignore) for sg in package.subgraphs]
    expert_plan = [_experts_of(model, sg, options) for sg in package.subgraphs]
    last = max((i for i, work in enumerate(zip(plan, expert_plan)) if any(work)), default=-1)
    if last < 0:
        raise SeqgenError(
            f"no nn.Linear to quantize inside the targets of {package.path} (ignore patterns: {options.ignore}); "
            "check --ignore, or emit with other --targets."
        )
    needs_data = algorithm.new_statistics(1, torch.device("cpu")) is not None or options.observe
    result = CalibrationResult()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    subgraphs = package.subgraphs[: last + 1]
    with tqdm(total=len(subgraphs), desc="subgraphs", unit="sg") as outer:
        for i, subgraph in enumerate(subgraphs):
            linears = plan[i]
            experts = {name: FusedExperts(name, module, algorithm, options.all_experts)
                       for name, module in expert_plan[i].items()}
            next_subgraph = subgraphs[i + 1] if i + 1 < len(subgraphs) else None
            seconds: dict[str, float] = {}
            tick = time.perf_counter()
            dispatcher.onload(subgraph)
            if next_subgraph is not None:
                dispatcher.prefetch(next_subgraph)
            seconds["onload"] = time.perf_counter() - tick
            done: dict[str, QuantizedWeight] = {}
            work = bool(linears or experts)
            expert_done: dict[str, QuantizedWeight] = {}
            with tqdm(total=len(cache) * (2 if work and needs_data and options.propagate_error else 1),
                      desc=subgraph.name, leave=False, unit="batch") as bar:
                if work and needs_data:
                    tick = time.perf_counter()
                    collector = _Collector(algorithm, linears, options.observe)
                    with torch.no_grad(), collector, ExitStack() as stack:
                        for fused in experts.values():
                            stack.enter_context(fused)
                        cache.run(model, subgraph, commit=not options.propagate_error,
                                  before_batch=lambda b: collector.new_batch(cache.attention_mask(b)),
                                  progress=lambda: bar.update())
                    seconds["calibrate"] = time.perf_counter() - tick
                    tick = time.perf_counter()
                    done = _compress(algorithm, linears, collector.stats)
                    for name, observer in collector.observers.items():
                        observer.reduce_()
                        result.activation_stats[name] = observer.summary()
                    del collector
                    seconds["compress"] = time.perf_counter() - tick
                elif work:
                    done = _compress(algorithm, linears, {name: None for name in linears})
                for fused in experts.values():
                    expert_done.update(fused.compress())
                experts.clear()
                if options.propagate_error or not (work and needs_data):
                    tick = time.perf_counter()
                    with torch.no_grad():
                        cache.run(model, subgraph, commit=True, progress=lambda: bar.update())
                    seconds["propagate"] = time.perf_counter() - tick
            tick = time.perf_counter()
            if on_subgraph_done is not None:
                on_subgraph_done(subgraph, done)
            changed = [f"{name}.weight" for name in done]
            changed += [f"{name}.{param}" for name in expert_plan[i] for param in ("gate_up_proj", "down_proj")]
            dispatcher.offload(subgraph, changed=changed)
            seconds["offload"] = time.perf_counter() - tick
            if keep_results:
                result.quantized.update(done)
                result.experts.update(expert_done)
            result.linears += len(done)
            result.reports.append(SubgraphReport(subgraph.name, len(linears), seconds))
            outer.update()
    result.seconds = time.perf_counter() - start
    if device.type == "cuda":
        result.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    logger.info("calibrated %d linears and %d expert projections in %d subgraphs in %.1fs", result.linears,
                len(result.experts), len(subgraphs), result.seconds)
    return result


def _experts_of(model: torch.nn.Module, subgraph: Subgraph, options: CalibrationOptions) -> dict[str, torch.nn.Module]:
    if not options.quantize_experts:
        return {}
    found: dict[str, torch.nn.Module] = {}
    for target in subgraph.targets:
        module = model.get_submodule(target)
        for name in unsupported_experts(module, target):
            logger.warning("%s: fused experts of an unsupported layout are left unquantized", name)
        found.update({n: m for n, m in find_fused_experts(module, target).items()
                      if not any(re.search(p, n) for p in options.ignore)})
    return found


@torch.no_grad()
def _compress(
    algorithm: Algorithm, linears: Mapping[str, torch.nn.Linear], stats: Mapping[str, Statistics | None]
) -> dict[str, QuantizedWeight]:
    reduced: set[int] = set()
    for shared in stats.values():
        if shared is not None and id(shared) not in reduced:
            shared.reduce_()
            reduced.add(id(shared))
    done: dict[str, QuantizedWeight] = {}
    for name, module in linears.items():
        if name not in stats:
            raise SeqgenError(
                f"{name} never ran during the calibration pass, so it has no statistics (an expert no token was "
                "routed to, or a branch the samples never take). Add samples, or --ignore it."
            )
        quantized = algorithm.quantize(module.weight.data, stats[name])
        module.weight.data.copy_(quantized.dequantize(module.weight.dtype))
        done[name] = quantized.to("cpu")
    return done
