"""Run time: what generated code calls (guards) and sequential calibration (dispatch, intermediates, the steps)."""

import importlib

from .guards import guard

__all__ = [
    "guard",
    "CalibrationOptions",
    "CalibrationResult",
    "ModuleReport",
    "SubgraphReport",
    "calibrate",
    "QuantizationPlan",
    "plan_quantization",
    "Dispatcher",
    "execution_device",
    "IntermediatesCache",
]

# generated code imports guards only; the rest loads on first use
_LAZY = {
    "CalibrationOptions": "options",
    "CalibrationResult": "state",
    "ModuleReport": "state",
    "SubgraphReport": "state",
    "calibrate": "loop",
    "QuantizationPlan": "selection",
    "plan_quantization": "selection",
    "Dispatcher": "dispatch",
    "execution_device": "dispatch",
    "IntermediatesCache": "intermediates",
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'seqgen.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
