"""A user-defined algorithm: RTN whose per-row clipping ratio minimises the activation-weighted weight error."""

import torch

from seqgen.algorithms import (
    ActivationObserver,
    Algorithm,
    QuantizedWeight,
    QuantScheme,
    Statistics,
    get_algorithm,
    quantize_rtn,
    register_algorithm,
)


@register_algorithm
class ClippedRTN(Algorithm):
    """Try shrinking each group's range; per output row keep the ratio with least sum_j E[x_j^2] (w_j - q_j)^2."""

    name = "clipped-rtn"
    ratios = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)

    def new_statistics(self, in_features: int, device: torch.device) -> Statistics | None:
        return ActivationObserver(in_features, device)

    def quantize(self, weight: torch.Tensor, stats: Statistics | None) -> QuantizedWeight:
        assert isinstance(stats, ActivationObserver), "feed calibration data first"
        w = weight.detach().float()
        groups = w.reshape(w.shape[0], -1, self.scheme.effective_group_size(w.shape[1]))
        best, best_err = None, torch.full((w.shape[0],), float("inf"), device=w.device)
        for ratio in self.ratios:
            lo, hi = groups.amin(-1, keepdim=True) * ratio, groups.amax(-1, keepdim=True) * ratio
            q = quantize_rtn(groups.clamp(lo, hi).reshape_as(w), self.scheme)
            err = ((q.dequantize() - w).square() * stats.mean_sq.to(w.device)).sum(dim=1)
            best = q if best is None else best
            rows = err < best_err  # rows are independent: take their codes and parameters one by one
            for field in ("codes", "scale", "zero_point"):
                if getattr(best, field) is not None:
                    getattr(best, field)[rows] = getattr(q, field)[rows]
            best_err = torch.minimum(best_err, err)
        return best


if __name__ == "__main__":
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(2048, 256) * torch.rand(256) * 2  # channels of uneven magnitude, like real activations
    for name in ("rtn", "clipped-rtn", "gptq"):
        algo = get_algorithm(name, QuantScheme(bits=4, group_size=64))
        stats = algo.new_statistics(256, x.device)
        if stats is not None:
            stats.update(x)
            stats.reduce_()
        ref = x @ linear.weight.detach().T
        err = (x @ algo.quantize(linear.weight, stats).dequantize().T - ref).norm() / ref.norm()
        print(f"{name:12s} relative output reconstruction error {err:.5f}")
