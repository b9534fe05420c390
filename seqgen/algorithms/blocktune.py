"""Block tuning: learn the rounding and the group scales of a whole subgraph's linears at once, so that the
subgraph's quantized output matches its full-precision output on the calibration inputs.

A linear starts from a :class:`~seqgen.algorithms.QuantizedWeight` (RTN's or GPTQ's codes ``q0`` and scales ``s0``)
and gets two learned tensors: a rounding offset ``v`` per element, in ``[-0.5, 0.5]``, and a clipping factor ``c``
per group, in ``[0.5, 1]``. Its codes and weight are then

    s = s0 * c        q = clamp(round(w / s + v) + d + z, qmin, qmax)        w_q = (q - z) * s

where ``d = q0 - z - round(w / s0)`` is fixed: the integer steps the starting algorithm took away from plain
rounding (zero for RTN), so ``v = 0, c = 1`` gives back the start exactly. The rounding passes gradients straight
through. All linears of the subgraph are tuned together against the mean squared error of the subgraph's outputs,
with signed gradient descent (the step is ``lr * sign(grad)``, ``lr`` decaying linearly to zero), as AutoRound
does. The result is the tuned state or the start, whichever has the lower error over all calibration batches, so
tuning never makes a subgraph worse on its own data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils import parametrize

from .base import QuantizedWeight

__all__ = ["TuneOptions", "TuneReport", "TunedWeight", "output_tensors", "tune_block"]

logger = logging.getLogger(__name__)

_CLIP_RANGE = (0.5, 1.0)  # a group's scale may shrink to half, never grow: clipping, as AutoRound's min/max scales


@dataclass(frozen=True)
class TuneOptions:
    """How block tuning runs: ``iterations`` signed-gradient steps of ``lr`` (default ``1 / iterations``, which
    lets an offset cross half of its range), each on one calibration batch, in an order drawn from ``seed``."""

    iterations: int = 200
    lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"TuneOptions.iterations must be a positive integer, got {self.iterations!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"TuneOptions.lr must be a positive float or None, got {self.lr!r}")

    @property
    def step(self) -> float:
        """The first iteration's step size."""
        return self.lr if self.lr is not None else 1.0 / self.iterations


@dataclass(frozen=True)
class TuneReport:
    """A subgraph's output error (mean squared, summed over its outputs and averaged over the calibration
    batches) at the start and after tuning; the weights kept are those of the lower one."""

    start: float
    tuned: float


class TunedWeight(torch.nn.Module):
    """A parametrization of a linear's weight: the full-precision weight in, the weight its learned codes and scales
    stand for out (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, start: QuantizedWeight) -> None:
        super().__init__()
        scheme = start.scheme
        self.scheme = scheme
        self.g_idx = start.g_idx
        self.scale_dtype = weight.dtype
        device = weight.device
        self.register_buffer("group", start.group_index().to(device), persistent=False)
        self.register_buffer("scale0", start.scale.to(device, torch.float32), persistent=False)
        self.zero_point = start.zero_point  # per group, as stored; fixed
        zero = None if start.zero_point is None else start.zero_point.to(device, torch.float32)[:, self.group]
        self.register_buffer("zero", zero, persistent=False)
        plain = torch.round(weight.detach().float() / self.scale0[:, self.group])
        offset = start.codes.to(device, torch.float32) - plain - (0 if zero is None else zero)
        self.register_buffer("offset", offset, persistent=False)
        self.rounding = torch.nn.Parameter(torch.zeros_like(plain))
        self.clip = torch.nn.Parameter(torch.ones_like(self.scale0))

    def scale(self) -> torch.Tensor:
        """The groups' scales ``[rows, groups]``, rounded to the dtype they are stored in (the weight's)."""
        return (self.scale0 * self.clip).to(self.scale_dtype).float()

    def codes(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Integer codes, as floats, of ``weight`` on the per-group ``scale`` (rounding straight-through)."""
        x = weight.detach().float() / scale[:, self.group] + self.rounding
        q = x + (torch.round(x) - x).detach() + self.offset
        if self.zero is not None:
            q = q + self.zero
        return q.clamp(self.scheme.qmin, self.scheme.qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.scale()
        q = self.codes(weight, scale)
        if self.zero is not None:
            q = q - self.zero
        return (q * scale[:, self.group]).to(weight.dtype)

    @torch.no_grad()
    def quantized(self, weight: torch.Tensor) -> QuantizedWeight:
        """The learned codes and scales, as the starting algorithm would have returned them (on the CPU)."""
        scale = self.scale()
        codes = self.codes(weight, scale).to(self.scheme.code_dtype)
        quantized = QuantizedWeight(codes, scale, self.zero_point, self.g_idx, self.scheme)
        return quantized.to("cpu")

    def clamp_(self) -> None:
        """Keep the learned tensors in their ranges (after each step)."""
        with torch.no_grad():
            self.rounding.clamp_(-0.5, 0.5)
            self.clip.clamp_(*_CLIP_RANGE)


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a subgraph's outputs (dicts, tuples, lists), in a fixed order."""
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() else []
    if isinstance(outputs, Mapping):
        return [t for key in sorted(outputs) for t in output_tensors(outputs[key])]
    if isinstance(outputs, (tuple, list)):
        return [t for value in outputs for t in output_tensors(value)]
    return []


def _error(outputs: Any, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    got = output_tensors(outputs)
    return sum(
        (torch.nn.functional.mse_loss(a.float(), b.to(a.device).float()) for a, b in zip(got, targets, strict=True)),
        torch.zeros((), device=got[0].device),
    )


@contextmanager
def _parametrized(
    linears: Mapping[str, tuple[torch.nn.Linear, torch.Tensor, QuantizedWeight]],
) -> Iterator[dict[str, TunedWeight]]:
    """The linears' weights as :class:`TunedWeight` of their full-precision weights, for the block; afterwards each
    weight is its full-precision one again."""
    tuned = {}
    try:
        for name, (module, weight, start) in linears.items():
            module.weight.data.copy_(weight)
            tuned[name] = TunedWeight(weight, start)
            parametrize.register_parametrization(module, "weight", tuned[name], unsafe=True)
        yield tuned
    finally:
        for name in tuned:
            parametrize.remove_parametrizations(linears[name][0], "weight", leave_parametrized=False)


def tune_block(
    forward: Callable[[int], Any],
    targets: Sequence[Sequence[torch.Tensor]],
    linears: Mapping[str, tuple[torch.nn.Linear, torch.Tensor, QuantizedWeight]],
    options: TuneOptions,
    progress: Callable[[], None] | None = None,
) -> tuple[dict[str, QuantizedWeight], TuneReport]:
    """Tune ``linears`` (name -> module, full-precision weight, starting point) so that ``forward(i)``, the block run
    on calibration batch ``i``, gives ``targets[i]`` (:func:`output_tensors` of the full-precision outputs).

    Returns the quantized weights (on the CPU) and the report; each module's weight is left as its dequantized
    quantized weight. Deterministic for a given ``options.seed`` on a given device.
    """
    order = torch.Generator().manual_seed(options.seed)
    with _parametrized(linears) as tuned:
        params = [p for t in tuned.values() for p in (t.rounding, t.clip)]
        start = _mean_error(forward, targets)
        before = {name: t.quantized(linears[name][1]) for name, t in tuned.items()}
        batches: list[int] = []
        for step in range(options.iterations):
            if not batches:
                batches = torch.randperm(len(targets), generator=order).tolist()
            i = batches.pop()
            with torch.enable_grad():
                loss = _error(forward(i), targets[i])
                grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
            lr = options.step * (1 - step / options.iterations)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g.sign(), alpha=lr)
            for t in tuned.values():
                t.clamp_()
            if progress is not None:
                progress()
        end = _mean_error(forward, targets)
        after = {name: t.quantized(linears[name][1]) for name, t in tuned.items()}
    kept = after if end < start else before
    for name, (module, _, _) in linears.items():
        module.weight.data.copy_(kept[name].dequantize(module.weight.dtype).to(module.weight.device))
    return kept, TuneReport(start, end)


@torch.no_grad()
def _mean_error(forward: Callable[[int], Any], targets: Sequence[Sequence[torch.Tensor]]) -> float:
    return sum(_error(forward(i), targets[i]).item() for i in range(len(targets))) / len(targets)
