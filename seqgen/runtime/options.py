"""The options of a calibration (:func:`seqgen.runtime.calibrate`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..algorithms import QuantScheme
from ..algorithms.blocktune import TuneOptions

__all__ = ["DEFAULT_OPTIONS", "CalibrationOptions"]


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
    # GPTQ: sum each batch's X^T X in fp64, so the Hessian does not depend on the order of the batches: a run split
    # over torchrun's ranks then quantizes bitwise as one process does (with this option too). Twice the memory of
    # the statistics.
    exact_hessian: bool = False
    # block tuning after each subgraph's compress step, from the algorithm's result (None: no tuning; see
    # seqgen.algorithms.blocktune). It always propagates the quantized outputs, whatever propagate_error says.
    tune: TuneOptions | None = None
    # SmoothQuant's strength alpha (0.8 in llm-compressor's W8A8 recipe); None: no smoothing (runtime/smoothing.py)
    smoothquant: float | None = None

    @property
    def observes_activations(self) -> bool:
        """Activation statistics are collected: ``observe``, a static activation scheme (its input scales), or
        SmoothQuant (its factors)."""
        activations = self.scheme.activations
        static = activations is not None and not activations.dynamic
        return self.observe or static or self.smoothquant is not None


DEFAULT_OPTIONS = CalibrationOptions()
