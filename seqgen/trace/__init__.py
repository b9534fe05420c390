"""Tracing: an HF-aware torch.fx tracer, leaf rules and sequential targets."""

from .targets import find_targets
from .tracer import Guard, InputSpec, Trace, trace_model

__all__ = ["find_targets", "Guard", "InputSpec", "Trace", "trace_model"]
