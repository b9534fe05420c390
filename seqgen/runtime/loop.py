"""Sequential calibration: one subgraph at a time, from a loaded package.

:func:`calibrate` checks its inputs, plans what each subgraph quantizes (:mod:`seqgen.runtime.selection`), and runs
each subgraph's steps (:func:`seqgen.runtime.steps.calibrate_subgraph`: onload, calibration pass, reduce, compress,
propagate, offload). Subgraphs with nothing to quantize run once; the subgraphs after the last quantized one do not
run at all (their outputs, the logits, are not needed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import closing, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..algorithms import GPTQ, get_algorithm
from ..errors import SeqgenError
from ..package import Package
from .dispatch import Dispatcher, execution_device
from .distributed import distributed_rank, report_failure
from .faults import finite_outputs
from .intermediates import IntermediatesCache
from .memory import reuse_large_allocations
from .options import DEFAULT_OPTIONS, CalibrationOptions
from .selection import plan_quantization
from .state import CalibrationResult, CalibrationRun, CalibrationState, SubgraphDone
from .steps import calibrate_subgraph

if TYPE_CHECKING:
    from ..checkpoint import SafetensorsWeights
    from ..run import Checkpointer

__all__ = ["calibrate", "finish", "prepare"]

logger = logging.getLogger(__name__)


def calibrate(
    model: torch.nn.Module,
    package: Package,
    batches: list[Mapping[str, Any]],
    options: CalibrationOptions = DEFAULT_OPTIONS,
    *,
    weights: SafetensorsWeights | None = None,
    on_subgraph_done: SubgraphDone | None = None,
    keep_results: bool = True,
    checkpoint: Checkpointer | None = None,
) -> CalibrationResult:
    """Quantize ``model`` in place, subgraph by subgraph, on ``batches`` (dicts of the package's inputs).

    ``on_subgraph_done(subgraph, quantized, experts)`` runs while the subgraph's weights are still on the device
    (streamed saving), with its quantized linears and fused experts (keyed as in :class:`CalibrationResult`); with
    ``keep_results=False`` the quantized weights are not also kept in the result (disk offload). ``checkpoint``
    writes the state between subgraphs to a run directory, and first resumes from the checkpoint it holds (see
    :class:`seqgen.run.Checkpointer`).
    """
    run, state = prepare(
        model, package, batches, options, weights=weights, on_subgraph_done=on_subgraph_done, keep_results=keep_results
    )
    bar = tqdm(total=len(run.subgraphs), desc="subgraphs", unit="sg")
    with closing(state.cache), checkpoint or nullcontext(), bar:
        if checkpoint is not None:
            checkpoint.restore(run, state)
            bar.update(state.next_subgraph)
        while state.next_subgraph < len(run.subgraphs):
            with report_failure(run.subgraphs[state.next_subgraph].name):
                calibrate_subgraph(run, state)
            bar.update()
            if checkpoint is not None:
                checkpoint.after_subgraph(run, state)
    return finish(run, state)


def prepare(
    model: torch.nn.Module,
    package: Package,
    batches: list[Mapping[str, Any]],
    options: CalibrationOptions = DEFAULT_OPTIONS,
    *,
    weights: SafetensorsWeights | None = None,
    on_subgraph_done: SubgraphDone | None = None,
    keep_results: bool = True,
) -> tuple[CalibrationRun, CalibrationState]:
    """Check the arguments of :func:`calibrate` and plan the run: its fixed part, and the state before the first
    subgraph (close ``state.cache`` when done)."""
    if not batches:
        raise SeqgenError("calibration needs at least one batch; check --num-samples and the dataset.")
    if options.experts_per_pass is not None and options.experts_per_pass < 1:
        raise SeqgenError(f"experts_per_pass must be a positive number of experts, got {options.experts_per_pass}.")
    if options.tune is not None and distributed_rank()[1] > 1:
        raise SeqgenError(
            "block tuning runs in one process only: each rank would tune on its own batches, and the ranks' weights "
            "would differ. Run it without torchrun or --nproc."
        )
    package.check_model(model)
    for batch in batches:
        package.check_batch(batch)
    device = execution_device(options.device)
    if device.type == "cpu" and options.reuse_allocations:
        reuse_large_allocations()
    algorithm = get_algorithm(options.algorithm, options.scheme)
    if options.exact_hessian and isinstance(algorithm, GPTQ):
        algorithm.hessian_dtype = torch.float64
    dispatcher = Dispatcher(model, device, weights)
    plan = plan_quantization(
        model,
        package,
        scheme=options.scheme,
        ignore=options.ignore,
        quantize_experts=options.quantize_experts,
        from_disk=weights is not None,
    )
    subgraphs = tuple(finite_outputs(subgraph) for subgraph in package.subgraphs[: len(plan)])  # NaN/inf named
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    dispatcher.check(list(subgraphs))
    run = CalibrationRun(
        model=model,
        subgraphs=subgraphs,
        plan=plan,
        options=options,
        algorithm=algorithm,
        dispatcher=dispatcher,
        needs_data=algorithm.new_statistics(1, torch.device("cpu")) is not None or options.observes_activations,
        from_disk=weights is not None,
        on_subgraph_done=on_subgraph_done,
        keep_results=keep_results,
        started=started,
    )
    return run, CalibrationState(IntermediatesCache(batches, device, options.spill_dir), CalibrationResult())


def finish(run: CalibrationRun, state: CalibrationState) -> CalibrationResult:
    """The result, once every subgraph is calibrated: with the run's seconds and its peak device memory."""
    result = state.result
    result.seconds = time.perf_counter() - run.started
    device = run.dispatcher.device
    if device.type == "cuda":  # each subgraph measures its own peak (see steps.record)
        result.peak_device_bytes = max((r.device_peak_bytes or 0 for r in result.reports), default=0)
    logger.info(
        "calibrated %d linears and %d expert projections in %d subgraphs in %.1fs (%s)",
        result.linears,
        len(result.experts),
        len(run.subgraphs),
        result.seconds,
        result.phase_summary(),
    )
    return result
