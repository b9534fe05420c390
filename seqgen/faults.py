"""Named points where a crash-safety test kills the process: the only fault injection in seqgen.

The library calls :func:`fault_point` at a few named places:

=============  ==============================================================================
``pass``       each batch of a subgraph's calibration or propagation pass
``compress``   each quantize call (one linear, or linears that share statistics)
``checkpoint`` each file of a run directory's checkpoint, before it is written
``save``       the final save, after its weights are written and before it is renamed
=============  ==============================================================================

``SEQGEN_FAULT_POINT=NAME:N[:SIGNAL]`` sends SIGKILL (or SIGNAL, e.g. ``SIGTERM``) to the process itself at its N-th
arrival at point NAME (counted from 1).
``SEQGEN_FAULT_TRACE=FILE`` appends the name of every point reached to FILE, one per line, so that a test can count
the points of an uninterrupted run and pick where to kill. With neither set, a point costs two dictionary lookups.
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAULT_POINTS", "fault_point"]

FAULT_POINTS = ("pass", "compress", "checkpoint", "save")

_arrivals: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Mark point ``name``: kill the process here if ``SEQGEN_FAULT_POINT`` says so (see the module docstring)."""
    trace = os.environ.get("SEQGEN_FAULT_TRACE")
    target = os.environ.get("SEQGEN_FAULT_POINT")
    if trace is None and target is None:
        return
    if trace:
        with open(trace, "a") as log:
            log.write(f"{name}\n")
    _arrivals[name] = _arrivals.get(name, 0) + 1
    point, _, signame = (target or "").partition(":")[2].partition(":")
    if target and target.startswith(f"{name}:") and point == str(_arrivals[name]):
        os.kill(os.getpid(), getattr(signal, signame or "SIGKILL"))
