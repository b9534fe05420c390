"""Weight quantization algorithms and their registry.

>>> from seqgen.algorithms import QuantScheme, get_algorithm
>>> algo = get_algorithm("gptq", QuantScheme(bits=4, group_size=64))
>>> stats = algo.new_statistics(in_features, device)     # shared by linears reading the same input
>>> stats.update(x)                                      # every calibration batch
>>> stats.reduce_()                                      # once, sums over processes if distributed
>>> qweight = algo.quantize(linear.weight, stats)
"""

from __future__ import annotations

from .base import (
    ALGORITHMS,
    GRIDS,
    OBSERVERS,
    WEIGHT_TYPES,
    ActivationScheme,
    Algorithm,
    QuantizedWeight,
    QuantScheme,
    Statistics,
    compute_qparams,
    get_algorithm,
    quantize_codes,
    quantize_rtn,
    register_algorithm,
)
from .gptq import GPTQ, HessianStatistics
from .observer import ActivationObserver
from .presets import SUPPORTED_PRESETS, scheme_from_args, scheme_from_preset
from .rtn import RTN

__all__ = [
    "ALGORITHMS",
    "GRIDS",
    "OBSERVERS",
    "WEIGHT_TYPES",
    "SUPPORTED_PRESETS",
    "ActivationScheme",
    "scheme_from_args",
    "scheme_from_preset",
    "Algorithm",
    "QuantScheme",
    "QuantizedWeight",
    "Statistics",
    "get_algorithm",
    "register_algorithm",
    "quantize_rtn",
    "compute_qparams",
    "quantize_codes",
    "RTN",
    "GPTQ",
    "HessianStatistics",
    "ActivationObserver",
]
