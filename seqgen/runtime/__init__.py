"""Run time: what generated code calls (guards) and sequential calibration (dispatch, intermediates, the loop)."""

from .guards import guard

__all__ = [
    "guard",
    "CalibrationOptions",
    "CalibrationResult",
    "SubgraphReport",
    "calibrate",
    "Dispatcher",
    "execution_device",
    "IntermediatesCache",
]


def __getattr__(name: str):  # noqa: ANN202 - generated code imports guards only; the rest loads on first use
    if name in ("CalibrationOptions", "CalibrationResult", "SubgraphReport", "calibrate"):
        from . import loop as module
    elif name in ("Dispatcher", "execution_device"):
        from . import dispatch as module
    elif name == "IntermediatesCache":
        from . import intermediates as module
    else:
        raise AttributeError(f"module 'seqgen.runtime' has no attribute {name!r}")
    return getattr(module, name)
