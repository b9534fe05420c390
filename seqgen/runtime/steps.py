"""The steps of one subgraph's calibration, and :func:`calibrate_subgraph`, which runs them in order.

::

    onload ─► calibration pass ─► reduce ─► compress ─► propagate ─► offload
              (hooks collect      (the one   (quantize,   (quantized   (hand the results to on_subgraph_done,
               statistics)         place)     write back)  outputs)     weights back home)

1. **onload** exactly the modules the subgraph's index entry lists, and prefetch the next subgraph's;
2. **calibration pass** over all batches with hooks on what gets quantized (:class:`~seqgen.runtime.collector.Collector`
   for linears, :class:`~seqgen.runtime.experts.FusedExperts`). Its outputs are dropped, so after the first batch each
   batch stops at the last linear's input. With ``experts_per_pass`` steps 2-4 run once per group of experts: each
   group is quantized after its pass, and every weight is written back after the last (each pass sees the same model);
3. **reduce** the statistics: :func:`reduce_statistics` is the only place statistics are combined across processes;
4. **compress** every linear and expert: its weight becomes the dequantized quantized weight; with block tuning
   (``options.tune``, :mod:`seqgen.runtime.tuning`) a full-precision pass keeps the subgraph's outputs before the
   calibration pass, and the **tune** step after compress fits the quantized linears to them;
5. **propagate**: run again with quantized weights, so the next subgraph sees quantized outputs (skipped with
   ``propagate_error=False``: the calibration pass's outputs are kept instead);
6. **offload**, after ``on_subgraph_done`` has the subgraph's quantized weights (streamed saving).

Steps take the fixed :class:`~seqgen.runtime.state.CalibrationRun`, the :class:`~seqgen.runtime.state.CalibrationState`
that carries between subgraphs, and the subgraph's own :class:`~seqgen.runtime.state.SubgraphState`. After
:func:`record`, ``CalibrationState`` is all the next subgraph needs: that is where a checkpoint for resuming goes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from tqdm.auto import tqdm

from ..algorithms import QuantizedWeight, Statistics
from ..algorithms.activations import add_input_scales, quantize_inputs
from .collector import Collector
from .compress import compress_linears, never_ran, round_to_nearest, warn_never_ran
from .distributed import align_statistics, compress_owned
from .experts import FusedExperts, expert_params
from .faults import names_failures
from .memory import device_peak, release_free_memory, reset_device_peak, rss_peak
from .smoothing import NormInputs, smooth
from .state import CalibrationRun, CalibrationState, ModuleReport, SubgraphReport, SubgraphState
from .tuning import capture_reference, tune

__all__ = [
    "calibrate_subgraph",
    "calibration_pass",
    "compress",
    "offload",
    "onload",
    "propagate",
    "record",
    "reduce_statistics",
    "start_subgraph",
]

logger = logging.getLogger(__name__)


@names_failures  # CUDA out of memory: which subgraph, and what to change
def calibrate_subgraph(run: CalibrationRun, state: CalibrationState) -> None:
    """Calibrate the subgraph ``state.next_subgraph``: its steps, in order, each timed in its phase."""
    sub = start_subgraph(run, state)
    reset_device_peak(run.dispatcher.device)
    with _phase(sub, "onload"):
        onload(run, sub)
    with sub.bar:
        if run.options.tune is not None:
            with _phase(sub, "tune"):
                capture_reference(run, state, sub)
        for active in sub.passes:  # one pass, or one per group of experts (experts_per_pass)
            with _phase(sub, "calibrate"):
                calibration_pass(run, state, sub, active)
            with _phase(sub, "compress"):
                reduce_statistics(sub.collected())
                compress(run, state, sub)
        if not sub.passes:  # nothing to collect (RTN): compressed without statistics, outside the timed phases
            compress(run, state, sub)
        if run.options.tune is not None:
            with _phase(sub, "tune"):
                tune(run, state, sub)
        if sub.propagation_pass:
            with _phase(sub, "propagate"):
                propagate(run, state, sub)
    with _phase(sub, "offload"):
        offload(run, sub)
    record(run, state, sub)


@contextmanager
def _phase(sub: SubgraphState, phase: str) -> Iterator[None]:
    """Add the seconds of the block to ``sub.seconds[phase]``."""
    tick = time.perf_counter()
    yield
    sub.seconds[phase] = sub.seconds.get(phase, 0.0) + time.perf_counter() - tick


def start_subgraph(run: CalibrationRun, state: CalibrationState) -> SubgraphState:
    """The state of the next subgraph before its steps: what it quantizes, and which passes it runs. The last
    quantized subgraph's outputs feed nothing that runs: it has no propagation pass."""
    index = state.next_subgraph
    plan = run.plan[index]
    experts = {
        name: FusedExperts(
            name,
            module,
            run.algorithm,
            run.options.all_experts,
            parent=run.model.get_submodule(name.rpartition(".")[0]),
        )
        for name, module in plan.experts.items()
    }
    calibration_pass = bool(plan) and run.needs_data
    outputs_needed = index < len(run.subgraphs) - 1
    passes = _expert_passes(experts, run.options.experts_per_pass) if calibration_pass else []
    # block tuning reads the subgraph's inputs after the calibration pass, so that pass never replaces them; a run
    # that collects and tunes nothing (RTN, weight-only or dynamic activations) needs no subgraph's outputs at all
    tuning = run.options.tune is not None
    propagate = run.options.propagate_error or tuning
    propagation_pass = outputs_needed and (run.needs_data or tuning) and (propagate or not calibration_pass)
    subgraph = run.subgraphs[index]
    return SubgraphState(
        index=index,
        subgraph=subgraph,
        linears=dict(plan.linears),
        experts=experts,
        passes=passes,
        commit_calibration=outputs_needed and not propagate,
        propagation_pass=propagation_pass,
        bar=tqdm(
            total=len(state.cache) * (len(passes) + propagation_pass), desc=subgraph.name, leave=False, unit="batch"
        ),
    )


def _expert_passes(experts: dict[str, FusedExperts], per_pass: int | None) -> list[range]:
    """The experts each calibration pass collects statistics for: all in one pass, or ``per_pass`` at a time."""
    count = max((fused.num_experts for fused in experts.values()), default=0)
    if per_pass is None or per_pass >= count:
        return [range(count)]
    return [range(start, min(start + per_pass, count)) for start in range(0, count, per_pass)]


def onload(run: CalibrationRun, sub: SubgraphState) -> None:
    """Move the subgraph's modules to the device, and start moving the next subgraph's closer (prefetch)."""
    run.dispatcher.onload(sub.subgraph)
    if sub.index + 1 < len(run.subgraphs) and run.options.prefetch:
        run.dispatcher.prefetch(run.subgraphs[sub.index + 1])


def calibration_pass(run: CalibrationRun, state: CalibrationState, sub: SubgraphState, active: range) -> None:
    """Run the subgraph on every batch with hooks that collect statistics: the linears' in the first pass, the
    ``active`` experts' in each. The outputs are dropped, unless they are what the next subgraph reads
    (``commit_calibration``, after the last pass)."""
    first, last = sub.passes_done == 0, sub.passes_done == len(sub.passes) - 1
    sub.bar.set_description(f"{sub.subgraph.name} calibrate")
    if first:  # routing can differ per batch, so with fused experts every batch runs whole
        stop_early = not sub.commit_calibration and not sub.experts
        observe = run.options.observes_activations
        sub.collector = Collector(run.algorithm, sub.linears, observe, stop_early=stop_early)
    collector = sub.collector
    for fused in sub.experts.values():
        fused.select(active)
    if first and run.options.smoothquant is not None:
        sub.norm_inputs = NormInputs(run.model, sub.linears)
    with torch.no_grad(), ExitStack() as hooks:
        if first:
            hooks.enter_context(collector)
            if sub.norm_inputs is not None:
                hooks.enter_context(sub.norm_inputs)
        for fused in sub.experts.values():
            hooks.enter_context(fused)
        state.cache.run(
            run.model,
            sub.subgraph,
            commit=sub.commit_calibration and last,
            before_batch=(lambda b: collector.new_batch(state.cache.attention_mask(b))) if first else None,
            progress=lambda: sub.bar.update(),
        )
    sub.passes_done += 1
    align_statistics(sub, run.algorithm)  # under torchrun: the same statistics on every rank, ready to reduce


def reduce_statistics(statistics: Iterable[Statistics]) -> None:
    """Combine each of ``statistics`` across processes, in order (a no-op in one process). The only place where
    statistics are reduced: every calibration pass's statistics come through here before they are used."""
    for stats in statistics:
        stats.reduce_()


def compress(run: CalibrationRun, state: CalibrationState, sub: SubgraphState) -> None:
    """Quantize what the latest calibration pass collected statistics for (or everything, without statistics).
    Before the last pass only the active experts are quantized, their weights written back after the last."""
    if sub.passes:
        sub.bar.set_description(f"{sub.subgraph.name} compress")
    if run.from_disk:  # the pass's activations go back to the OS before GPTQ's peak
        release_free_memory()
    if sub.passes_done < len(sub.passes):
        for fused in sub.experts.values():
            sub.expert_quantized.update(_compress_experts(fused, state, defer=True))
        return
    if sub.collector is not None:
        if sub.norm_inputs is not None:  # SmoothQuant, before the weights are found
            collector = sub.collector
            strength = run.options.smoothquant
            sub.smoothed = smooth(
                run.model, sub.norm_inputs, collector.stats, collector.observers, strength, sub.subgraph.name
            )
        _compress_calibrated_linears(run, state, sub)
    else:
        sub.quantized = compress_linears(run.algorithm, sub.linears, {name: None for name in sub.linears})
    for fused in sub.experts.values():
        sub.expert_quantized.update(_compress_experts(fused, state))
        if fused.never_ran:
            warn_never_ran([fused.name], sub.subgraph.targets, state.warned)
            state.result.unquantized += [f"{fused.name}.{param}" for param in fused.params]
        fused.write_back()
    sub.experts.clear()


def _compress_calibrated_linears(run: CalibrationRun, state: CalibrationState, sub: SubgraphState) -> None:
    """Quantize the linears from their statistics; those that never ran stay as they are, except experts that no
    token reached (round-to-nearest). The statistics are released afterwards."""
    collector = sub.collector
    assert collector is not None
    never, unrouted = never_ran(sub.linears, collector.stats)
    if never:
        warn_never_ran(never, sub.subgraph.targets, state.warned)
        state.result.unquantized += never
    if unrouted:
        logger.warning(
            "%s (and %d more experts) received no calibration tokens and are quantized round-to-nearest (no "
            "statistics); add samples to give them data.",
            unrouted[0],
            len(unrouted) - 1,
        )
        state.result.round_to_nearest += unrouted
    sub.linears = {name: m for name, m in sub.linears.items() if name not in never}
    calibrated = {name: m for name, m in sub.linears.items() if name not in unrouted}
    sub.quantized = compress_owned(run.algorithm, calibrated, collector.stats)  # split over ranks under torchrun
    sub.quantized.update(round_to_nearest(run.options.scheme, {name: sub.linears[name] for name in unrouted}))
    add_input_scales(run.options.scheme, sub.quantized, collector.observers)
    if run.options.observe:
        for name, observer in collector.observers.items():
            state.result.activation_stats[name] = observer.summary()
    sub.tokens = dict(collector.tokens)
    sub.collector = None


def _compress_experts(fused: FusedExperts, state: CalibrationState, defer: bool = False) -> dict[str, QuantizedWeight]:
    done = fused.compress(defer)
    state.result.round_to_nearest += [f"{fused.name}.{param}.{e}" for param in fused.params for e in fused.unrouted]
    return done


def propagate(run: CalibrationRun, state: CalibrationState, sub: SubgraphState) -> None:
    """Run the subgraph, quantized now, on every batch; its outputs replace the values it consumes."""
    sub.bar.set_description(f"{sub.subgraph.name} propagate")
    with torch.no_grad(), quantize_inputs(sub.linears, sub.quantized):  # W8A8: the inputs the checkpoint sees
        state.cache.run(run.model, sub.subgraph, commit=True, progress=lambda: sub.bar.update())


def offload(run: CalibrationRun, sub: SubgraphState) -> None:
    """Hand the quantized weights to ``on_subgraph_done`` while they are still on the device, then move the
    subgraph's modules back (disk offload: their memory goes back to the OS)."""
    if run.on_subgraph_done is not None:
        run.on_subgraph_done(sub.subgraph, sub.quantized, sub.expert_quantized)
    changed = [f"{name}.weight" for name in sub.quantized] + sub.smoothed
    changed += [
        f"{name}.{param}" for name, module in run.plan[sub.index].experts.items() for param in expert_params(module)
    ]
    run.dispatcher.offload(sub.subgraph, changed=changed)
    if run.from_disk:
        release_free_memory()


def record(run: CalibrationRun, state: CalibrationState, sub: SubgraphState) -> None:
    """Add the subgraph's results and report to ``state``, which then points at the next subgraph."""
    if run.keep_results:
        state.result.quantized.update(sub.quantized)
        state.result.experts.update(sub.expert_quantized)
    state.result.linears += len(sub.quantized)
    state.result.reports.append(
        SubgraphReport(
            sub.subgraph.name,
            len(sub.linears),
            sub.seconds,
            modules={
                name: ModuleReport(quantized.scheme, sub.tokens.get(name), quantized.relative_error())
                for name, quantized in {**sub.quantized, **sub.expert_quantized}.items()
            },
            device_peak_bytes=device_peak(run.dispatcher.device),
            rss_peak_bytes=rss_peak(),
        )
    )
    state.next_subgraph += 1
