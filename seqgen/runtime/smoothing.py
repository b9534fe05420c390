"""SmoothQuant in the calibration loop: which norm feeds which linears, found while the subgraph runs, and the
smoothing applied between the calibration pass and the compress step.

The mapping comes from the graph as it executes rather than a table per architecture: a linear whose input tensor
*is* a norm's output (the same object) is fed by that norm. Linears fed otherwise (o_proj, down_proj) are left as
they are, as in llm-compressor's default mappings. A subgraph with none is named in a warning. The factors come
from the activation observers of the pass; folding rescales the collected statistics so that GPTQ's Hessian and the
static input scales are those of the smoothed inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..algorithms import ActivationObserver, Statistics
from ..algorithms.smoothquant import fold_into_norm, smoothing_factors

__all__ = ["NormInputs", "smooth"]

logger = logging.getLogger(__name__)


def _is_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.lower().endswith("norm")


class NormInputs:
    """Hooks that record, on the first batch, which norm's output each of ``linears`` reads (``fed_by``)."""

    def __init__(self, model: torch.nn.Module, linears: Mapping[str, torch.nn.Module]) -> None:
        self.model = model
        self.linears = linears
        self.fed_by: dict[str, str] = {}  # linear -> norm
        self._outputs: dict[int, tuple[torch.Tensor, str]] = {}
        self._done: set[str] = set()
        self._handles: list[Any] = []

    def _norm_hook(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, torch.Tensor) and len(self._done) < len(self.linears):
                self._outputs[id(output)] = (output, name)

        return hook

    def _linear_hook(self, name: str) -> Callable[..., None]:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if name in self._done:
                return
            self._done.add(name)
            found = self._outputs.get(id(args[0]))
            if found is not None and found[0] is args[0]:
                self.fed_by[name] = found[1]

        return pre_hook

    def groups(self) -> dict[str, list[str]]:
        """norm -> the linears it feeds."""
        found: dict[str, list[str]] = {}
        for linear, norm in self.fed_by.items():
            found.setdefault(norm, []).append(linear)
        return found

    def __enter__(self) -> NormInputs:
        for name, module in self.model.named_modules():
            if _is_norm(module):
                self._handles.append(module.register_forward_hook(self._norm_hook(name)))
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()


def smooth(
    model: torch.nn.Module,
    norms: NormInputs,
    stats: Mapping[str, Statistics | None],
    observers: Mapping[str, ActivationObserver],
    strength: float,
    where: str,
) -> list[str]:
    """Smooth every norm -> linears group that ``norms`` found; returns the names of the norm parameters changed.

    ``stats`` (shared between linears of one input) and ``observers`` are rescaled to the smoothed inputs.
    """
    groups = norms.groups()
    if not groups:
        logger.warning(
            "SmoothQuant: in %s of %s no quantized linear reads a norm's output directly, so nothing is smoothed "
            "there (this architecture has no norm -> linear mapping seqgen can find).",
            where,
            type(model).__name__,
        )
        return []
    changed = []
    for norm_name, linear_names in groups.items():
        names = [name for name in linear_names if name in observers and observers[name].count]
        if not names:
            continue
        linears = [norms.linears[name] for name in names]
        factors = smoothing_factors(observers[names[0]].absmax, [m.weight for m in linears], strength)
        norm = model.get_submodule(norm_name)
        if not fold_into_norm(norm, linears, factors):
            logger.warning(
                "SmoothQuant: %s (%s) does not scale its output by its weight; %s left unsmoothed.",
                norm_name,
                type(norm).__name__,
                ", ".join(names),
            )
            continue
        for shared in {id(stats[n]): stats[n] for n in names if stats.get(n) is not None}.values():
            shared.scale_inputs_(factors)
        for name in names:
            observers[name].scale_inputs_(factors)
        changed += [f"{norm_name}.{param}" for param, _ in norm.named_parameters(recurse=False)]
    return changed
