"""Block tuning's two steps (with ``CalibrationOptions.tune``; the math is :mod:`seqgen.algorithms.blocktune`).

* :func:`capture_reference`, before the compress step: the full-precision weights of the subgraph's linears, and
  its full-precision outputs on every batch (one extra pass, outputs of this subgraph only);
* :func:`tune`, after it: every quantized linear of the subgraph tuned at once from the algorithm's result, against
  those outputs, on the cached inputs. Fused MoE experts keep the algorithm's result.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from ..algorithms.blocktune import output_tensors, tune_block
from .state import CalibrationRun, CalibrationState, SubgraphState, TuneReference

__all__ = ["capture_reference", "tune"]

logger = logging.getLogger(__name__)


def capture_reference(run: CalibrationRun, state: CalibrationState, sub: SubgraphState) -> None:
    """Keep what block tuning matches: the linears' full-precision weights and the subgraph's outputs per batch."""
    if not sub.linears:
        return
    sub.bar.set_description(f"{sub.subgraph.name} reference")
    weights = {name: module.weight.detach().clone() for name, module in sub.linears.items()}
    outputs = []
    with torch.no_grad():
        for i in range(len(state.cache)):
            values = sub.subgraph.forward(run.model, **state.cache.inputs(i, sub.subgraph))
            outputs.append([t.to(state.cache.storage) for t in output_tensors(values)])
    sub.reference = TuneReference(weights, outputs)


def tune(run: CalibrationRun, state: CalibrationState, sub: SubgraphState) -> None:
    """Tune the subgraph's quantized linears together; their weights and ``sub.quantized`` become the result."""
    reference, sub.reference = sub.reference, None
    options = run.options.tune
    if reference is None or options is None:  # nothing to quantize
        return
    linears = {name: (sub.linears[name], reference.weights[name], sub.quantized[name]) for name in sub.quantized}
    if not linears:
        return
    autocast: Any = contextlib.nullcontext()
    if state.cache.device.type == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def forward(i: int) -> Any:
        with autocast:
            return sub.subgraph.forward(run.model, **state.cache.inputs(i, sub.subgraph))

    sub.bar.set_description(f"{sub.subgraph.name} tune")
    sub.bar.total += options.iterations
    tuned, report = tune_block(forward, reference.outputs, linears, options, progress=lambda: sub.bar.update())
    sub.quantized.update(tuned)
    state.result.tuned[sub.subgraph.name] = report
    logger.info("%s: output error %.4g tuned, %.4g at the start", sub.subgraph.name, report.tuned, report.start)
