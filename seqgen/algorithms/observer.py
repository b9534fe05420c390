"""Per-input-channel activation statistics: running min, max, absmax, mean of squares and token count."""

from __future__ import annotations

import torch

from .base import Statistics, distributed_active

__all__ = ["ActivationObserver"]


class ActivationObserver(Statistics):
    """Observes the inputs of a linear, one value per input channel (fp32 on ``device``).

    ``mean_sq`` is a running average (old mean scaled by ``N_old / N_new``), the diagonal of GPTQ's ``H / 2``.
    Useful for activation-aware clipping/scaling and for reports (:meth:`summary`).
    """

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self.in_features = in_features
        kw = {"dtype": torch.float32, "device": device}
        self.min = torch.full((in_features,), float("inf"), **kw)
        self.max = torch.full((in_features,), float("-inf"), **kw)
        self.absmax = torch.zeros(in_features, **kw)
        self.mean_sq = torch.zeros(in_features, **kw)
        self.count = 0
        self._reduced = False

    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"ActivationObserver expects inputs with last dim {self.in_features}, got shape {tuple(x.shape)}"
            )
        x = x.detach().reshape(-1, self.in_features).to(device=self.min.device, dtype=torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        self._reduced = False
        lo, hi = x.aminmax(dim=0)
        torch.minimum(self.min, lo, out=self.min)
        torch.maximum(self.max, hi, out=self.max)
        torch.maximum(self.absmax, torch.maximum(lo.abs(), hi.abs()), out=self.absmax)
        total = self.count + n
        self.mean_sq.mul_(self.count / total).add_(x.square().sum(dim=0), alpha=1.0 / total)
        self.count = total

    def reduce_(self) -> None:
        """min/max/absmax reduce with MIN/MAX; ``mean_sq`` is the token-weighted mean over processes."""
        if not distributed_active() or self._reduced:
            return
        dist = torch.distributed
        dist.all_reduce(self.min, op=dist.ReduceOp.MIN)
        dist.all_reduce(self.max, op=dist.ReduceOp.MAX)
        dist.all_reduce(self.absmax, op=dist.ReduceOp.MAX)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.min.device)
        dist.all_reduce(count)
        total = int(count.item())
        if total > 0:
            self.mean_sq.mul_(self.count / total)
            dist.all_reduce(self.mean_sq)
        self.count = total
        self._reduced = True

    def scale_inputs_(self, factors: torch.Tensor) -> None:
        """The statistics of the inputs divided by ``factors`` (positive, per channel), in place (SmoothQuant)."""
        factors = factors.to(device=self.min.device, dtype=torch.float32)
        for values in (self.min, self.max, self.absmax):
            values.div_(factors)
        self.mean_sq.div_(factors.square())

    def summary(self) -> dict[str, torch.Tensor]:
        """Copies of the statistics to save or report: min, max, absmax, mean_sq, rms, count."""
        return {
            "min": self.min.clone(),
            "max": self.max.clone(),
            "absmax": self.absmax.clone(),
            "mean_sq": self.mean_sq.clone(),
            "rms": self.mean_sq.sqrt(),
            "count": torch.tensor(self.count, dtype=torch.int64),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "min": self.min,
            "max": self.max,
            "absmax": self.absmax,
            "mean_sq": self.mean_sq,
            "count": torch.tensor(self.count, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("min", "max", "absmax", "mean_sq"):
            value = state[key]
            if tuple(value.shape) != (self.in_features,):
                raise ValueError(f"{key} of shape {tuple(value.shape)} does not fit {self.in_features} input channels")
            getattr(self, key).copy_(value)
        self.count = int(state["count"])
        self._reduced = False
