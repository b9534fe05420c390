"""Run-time checks of the control-flow decisions that tracing froze.

When traced code branches on a value (``if seq_len > self.sliding_window``), only the branch taken by the sample input
is in the graph. The generated code then calls :func:`guard` with the same value and the decision taken, so a batch
on the other side of the branch fails loudly instead of computing a wrong result. A check is one comparison of
Python scalars or of a 0-d tensor: cheap next to a decoder layer.
"""

from __future__ import annotations

from typing import Any

from ..errors import GuardError

__all__ = ["guard"]


def guard(value: Any, expected: bool | int, where: str) -> None:
    """Raise :class:`GuardError` unless ``value`` converts to ``expected`` (a bool or an int)."""
    actual = bool(value) if isinstance(expected, bool) else int(value)
    if actual != expected:
        raise GuardError(
            f"guard failed at {where}: this batch gives {actual!r} where the emitted package assumed {expected!r}. "
            "The package was traced with a sample on the other side of this branch, so it cannot run this batch. "
            "Re-emit with a representative sample (`seqgen emit MODEL OUT --sample-shape BATCH,SEQ --force`), or "
            "shape batches to match the sample's side of the branch."
        )
