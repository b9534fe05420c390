"""Round-to-nearest (RTN): quantize every weight element on its own; needs no calibration data."""

from __future__ import annotations

import torch

from .base import Algorithm, QuantizedWeight, Statistics, quantize_rtn, register_algorithm

__all__ = ["RTN"]


@register_algorithm
class RTN(Algorithm):
    """Per-group round-to-nearest; the baseline every data-aware algorithm should beat. Ignores ``act_order``."""

    name = "rtn"
    row_separable = True

    def new_statistics(self, in_features: int, device: torch.device) -> Statistics | None:
        return None

    def quantize(self, weight: torch.Tensor, stats: Statistics | None = None) -> QuantizedWeight:
        return quantize_rtn(weight, self.scheme)
