"""Failures inside a subgraph's calibration, told by subgraph and module: NaN or inf in activations, out of memory.

- :func:`finite_outputs` checks what a subgraph returns, one sum per output tensor per batch (about 1% of a
  SmolLM2 layer's forward pass on the CPU, ``bench/finite_check.py``; on a GPU, reading the sum also waits for the
  batch to finish). When a value is not
  finite, the subgraph runs again on the same batch with a hook on every module, and the error names the first module
  whose output holds NaN or inf. The first batch of every pass runs whole, so that is where NaN from the weights show;
  values that turn non-finite only in a later batch of a calibration pass that stops early (at the last linear's
  input) reach GPTQ's Hessian instead, whose error names the linears that read them
  (:func:`seqgen.runtime.compress.compress_linears`).
- :func:`names_failures` turns CUDA's out-of-memory error in a subgraph's steps into one that names the subgraph and
  what to change.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..errors import NumericalError, OutOfMemory
from .intermediates import StopBatch

if TYPE_CHECKING:
    from ..package import Subgraph
    from .state import CalibrationRun, CalibrationState

__all__ = ["all_finite", "finite_outputs", "first_nonfinite_module", "names_failures"]

Step = TypeVar("Step", bound=Callable[..., Any])


def finite_outputs(subgraph: Subgraph) -> Subgraph:
    """``subgraph`` with a ``forward`` that raises :class:`NumericalError` when an output holds NaN or inf."""
    forward = subgraph.forward

    def checked(model: torch.nn.Module, **inputs: Any) -> dict[str, Any]:
        outputs = forward(model, **inputs)
        if not all_finite(outputs):
            where = first_nonfinite_module(model, forward, inputs)
            raise NumericalError(
                f"NaN or inf first appear in {subgraph.name}, {where}. The checkpoint's weights may hold them, or the "
                "dtype overflows there: check the weights, or calibrate with --dtype float32."
            )
        return outputs

    return dataclasses.replace(subgraph, forward=checked)


def first_nonfinite_module(model: torch.nn.Module, forward: Callable[..., Any], inputs: dict[str, Any]) -> str:
    """Where a non-finite value first appears when ``forward`` runs on ``inputs``: the module whose output first
    holds one (hooks fire as modules finish, innermost first), else the inputs or the code between modules."""
    if not all_finite(inputs):
        return "in its inputs (the values the previous subgraph returned, or the batch)"
    first: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def check(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not first and not all_finite(output):
                first.append(f"in the output of {name} ({type(module).__name__})")

        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            forward(model, **inputs)
    except StopBatch:  # a calibration hook ends the batch early: what ran is enough
        pass
    finally:
        for handle in handles:
            handle.remove()
    return first[0] if first else "in its own code, between modules"


def all_finite(value: Any) -> bool:
    """No NaN or inf in the tensors of ``value``. A tensor's fp32 sum (one pass, no temporary) is finite when all its
    values are, and is 5x faster than ``isfinite().all()``; only a sum that overflows is looked at element-wise."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or bool(value.sum(dtype=torch.float32).isfinite()):
            return True
        return bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return all(all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    return True


def names_failures(step: Step) -> Step:
    """Decorate ``step(run, state)``, the steps of subgraph ``state.next_subgraph``: CUDA running out of memory there
    raises :class:`OutOfMemory` naming the subgraph and the options that need less memory."""

    @functools.wraps(step)
    def wrapper(run: CalibrationRun, state: CalibrationState, *args: Any, **kwargs: Any) -> Any:
        try:
            return step(run, state, *args, **kwargs)
        except torch.cuda.OutOfMemoryError as exc:
            name = run.subgraphs[state.next_subgraph].name
            reason = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
            raise OutOfMemory(
                f"{name} ran out of memory on {run.dispatcher.device} ({reason}). Pass a smaller --batch-size, or "
                "emit the package with finer --targets (a layer's attention and MLP apart, for example)."
            ) from None

    return wrapper  # type: ignore[return-value]
