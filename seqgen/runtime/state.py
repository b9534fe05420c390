"""What the steps of a calibration hand each other (see :mod:`seqgen.runtime.steps`).

* :class:`CalibrationRun`: what stays fixed for the whole run (the model, the options, the plan, the dispatcher);
* :class:`CalibrationState`: what one subgraph hands to the next, and nothing else does: the boundary values of every
  batch, the results so far, which subgraph comes next. A checkpoint written between subgraphs holds this.
* :class:`SubgraphState`: what the steps of one subgraph hand each other (its statistics, its quantized weights).
* :class:`CalibrationResult`: what the caller gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..algorithms import ActivationScheme, Algorithm, QuantizedWeight, QuantScheme, Statistics
from ..algorithms.blocktune import TuneReport
from ..package import Subgraph
from .collector import Collector
from .dispatch import Dispatcher
from .experts import FusedExperts
from .intermediates import IntermediatesCache
from .options import CalibrationOptions
from .selection import QuantizationPlan
from .smoothing import NormInputs

__all__ = [
    "PHASES",
    "CalibrationResult",
    "CalibrationRun",
    "CalibrationState",
    "ModuleReport",
    "SubgraphDone",
    "SubgraphReport",
    "SubgraphState",
    "TuneReference",
]

PHASES = (
    "onload",
    "calibrate",
    "compress",
    "tune",
    "propagate",
    "offload",
)  # a subgraph's timed phases, in the order they run

#: ``on_subgraph_done(subgraph, quantized, experts)``: called once per subgraph while its weights are still on the
#: device (streamed saving; a checkpoint of the run's state comes here later).
SubgraphDone = Callable[[Subgraph, dict[str, QuantizedWeight], dict[str, QuantizedWeight]], None]


@dataclass
class ModuleReport:
    """How one weight was quantized (a linear, or ``<module>.<param>.<expert>`` of fused experts)."""

    scheme: QuantScheme
    tokens: int | None  # calibration tokens its input had; None where not counted (no calibration pass, experts)
    relative_error: float | None  # ||(W - Q) X||^2 / ||W X||^2, where the algorithm measures it (GPTQ)


@dataclass
class SubgraphReport:
    name: str
    linears: int
    seconds: dict[str, float]
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    device_peak_bytes: int | None = None  # CUDA memory allocated at most while this subgraph ran
    rss_peak_bytes: int | None = None  # the process's peak resident memory so far (a high-water mark)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubgraphReport:
        """A report from its ``dataclasses.asdict`` form (a checkpoint's, when a run resumes)."""

        def scheme(fields: dict[str, Any]) -> QuantScheme:
            activations = fields.get("activations")
            return QuantScheme(**{**fields, "activations": activations and ActivationScheme(**activations)})

        modules = {name: ModuleReport(**{**m, "scheme": scheme(m["scheme"])}) for name, m in data["modules"].items()}
        return cls(**{**data, "modules": modules})


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
    tuned: dict[str, TuneReport] = field(default_factory=dict)  # per subgraph name, with block tuning

    def phase_seconds(self) -> dict[str, float]:
        """Seconds per phase, summed over the subgraphs, in the order the phases run (phases that never ran are
        left out)."""
        return {
            phase: sum(r.seconds[phase] for r in self.reports if phase in r.seconds)
            for phase in PHASES
            if any(phase in r.seconds for r in self.reports)
        }

    def phase_summary(self) -> str:
        """``phase_seconds`` as one line, e.g. ``calibrate 70.9s, compress 8.0s, propagate 49.4s``."""
        return ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in self.phase_seconds().items())


@dataclass(frozen=True)
class CalibrationRun:
    """What stays fixed while a calibration runs: built once by :func:`seqgen.runtime.loop.prepare`."""

    model: torch.nn.Module
    subgraphs: tuple[Subgraph, ...]  # the package's, up to the last that quantizes anything
    plan: QuantizationPlan  # what each of them quantizes
    options: CalibrationOptions
    algorithm: Algorithm
    dispatcher: Dispatcher
    needs_data: bool  # the algorithm collects statistics, or observe: each subgraph with work has calibration passes
    from_disk: bool  # weights are read from a checkpoint (disk offload): free memory goes back to the OS
    on_subgraph_done: SubgraphDone | None
    keep_results: bool  # keep the quantized weights in the result (False: streamed out by on_subgraph_done)
    started: float  # time.perf_counter() at the start


@dataclass
class CalibrationState:
    """What one subgraph hands to the next; nothing else carries between subgraphs."""

    cache: IntermediatesCache  # the values between subgraphs, per batch
    result: CalibrationResult  # quantized weights so far (unless streamed out), reports, what stayed unquantized
    warned: set[str] = field(default_factory=set)  # linears (their names inside a target) reported as never run
    next_subgraph: int = 0  # the index of the subgraph the next steps calibrate


@dataclass
class TuneReference:
    """What block tuning matches, taken before the compress step: the full-precision weights of the subgraph's
    linears, and the subgraph's full-precision outputs (``output_tensors``) per batch."""

    weights: dict[str, torch.Tensor]
    outputs: list[list[torch.Tensor]]


@dataclass
class SubgraphState:
    """What the steps of one subgraph hand each other."""

    index: int
    subgraph: Subgraph
    linears: dict[str, torch.nn.Linear]  # to quantize (after compressing: those that ran)
    experts: dict[str, FusedExperts]  # fused experts to quantize, cleared once written back
    passes: list[range]  # the experts each calibration pass collects statistics for; [] for no calibration pass
    commit_calibration: bool  # the calibration pass's outputs feed the next subgraph (propagate_error=False)
    propagation_pass: bool  # run again with quantized weights, to feed the next subgraph
    bar: tqdm
    passes_done: int = 0
    collector: Collector | None = None  # the linears' statistics, from the first pass until they are compressed
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    expert_quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # "<module>.<param>.<expert>"
    seconds: dict[str, float] = field(default_factory=dict)  # per phase
    tokens: dict[str, int] = field(default_factory=dict)  # calibration tokens of each linear's input
    reference: TuneReference | None = None  # with block tuning, from before the compress step until tuned
    norm_inputs: NormInputs | None = None  # SmoothQuant: which norm feeds which linears (first pass)
    smoothed: list[str] = field(default_factory=list)  # the norm parameters SmoothQuant changed

    def collected(self) -> list[Statistics]:
        """The statistics the latest calibration pass collected: the linears' (first pass only), then the active
        experts', each once."""
        linears = self.collector.statistics() if self.collector is not None and self.passes_done == 1 else []
        experts = [
            stats
            for fused in self.experts.values()
            for per_expert in (fused.gate_up_stats, fused.down_stats)
            for stats in per_expert
            if stats is not None
        ]
        return [*linears, *experts]
