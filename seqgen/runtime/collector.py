"""Forward pre-hooks that feed the inputs of a subgraph's linears to their calibration statistics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..algorithms import ActivationObserver, Algorithm, Statistics
from .intermediates import StopBatch

__all__ = ["Collector"]


class Collector:
    """Forward pre-hooks that feed each linear's input to its (possibly shared) statistics.

    Linears fed the same tensor (q/k/v, gate/up) share one :class:`~seqgen.algorithms.Statistics`, so e.g. their
    Hessian is computed once. With ``observe`` each linear also gets an :class:`ActivationObserver`.

    With ``stop_early`` (a pass whose outputs are dropped) a batch ends as soon as every linear has seen its input:
    the first batch runs whole and records which linear comes last; later batches raise :class:`StopBatch` in that
    linear's hook once all the others have fired, which skips e.g. the ``down_proj`` matmul and the residual add.
    """

    def __init__(
        self, algorithm: Algorithm, linears: Mapping[str, torch.nn.Linear], observe: bool, stop_early: bool = False
    ) -> None:
        self.algorithm = algorithm
        self.linears = linears
        self.observe = observe
        self.stop_early = stop_early
        self.stats: dict[str, Statistics | None] = {}
        self.observers: dict[str, ActivationObserver] = {}
        self.tokens: dict[str, int] = {}  # calibration tokens each linear's input had (padding left out)
        self.mask: torch.Tensor | None = None
        self._mask_tokens = 0
        self._seen: list[tuple[torch.Tensor, Statistics | None]] = []  # this batch: input tensor -> statistics
        self._updated: set[int] = set()
        self._fired: dict[str, None] = {}  # linears whose hook ran in this batch, in order
        self._last: str | None = None  # the last linear of a complete batch
        self._handles: list[Any] = []

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = None if mask is None or bool(mask.all()) else mask  # no padding: no token selection (no copy)
        self._mask_tokens = 0 if self.mask is None else int(self.mask.sum())
        if self.stop_early and self._last is None and len(self._fired) == len(self.linears):
            self._last = next(reversed(self._fired))
        self._seen.clear()
        self._updated.clear()
        self._fired.clear()

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
            return x[self.mask.to(x.device).bool()]
        return x.reshape(-1, x.shape[-1])

    def _count(self, x: torch.Tensor) -> int:
        """The number of rows :meth:`_tokens` selects, without selecting them."""
        if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
            return self._mask_tokens
        return x.numel() // x.shape[-1]

    def hook(self, name: str) -> Callable[..., None]:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if name not in self.stats:  # first batch: linears fed the same tensor share statistics
                shared = next((s for t, s in self._seen if t is x), None)
                if shared is None and not any(t is x for t, _ in self._seen):
                    shared = self.algorithm.new_statistics(module.in_features, x.device)
                    self._seen.append((x, shared))
                self.stats[name] = shared
            stats = self.stats[name]
            tokens = None
            if stats is not None and id(stats) not in self._updated:
                tokens = self._tokens(x)
                stats.update(tokens)
                self._updated.add(id(stats))
            if self.observe:
                observer = self.observers.setdefault(name, ActivationObserver(module.in_features, x.device))
                observer.update(self._tokens(x) if tokens is None else tokens)
            self._seen.append((x, stats))
            self.tokens[name] = self.tokens.get(name, 0) + self._count(x)
            if name in self._fired:  # runs twice per batch: its later calls must not be skipped
                self.stop_early = False
            self._fired[name] = None
            if self.stop_early and name == self._last and len(self._fired) == len(self.linears):
                raise StopBatch

        return pre_hook

    def statistics(self) -> list[Statistics]:
        """Every statistics object collected so far, each once (shared ones too), observers after the others."""
        unique = {id(s): s for s in self.stats.values() if s is not None}
        return [*unique.values(), *self.observers.values()]

    def __enter__(self) -> Collector:
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self.hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()
