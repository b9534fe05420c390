"""SmoothQuant: move the activations' outliers into the weights, before the weights are quantized.

For a norm whose output feeds linears ``W_1..W_k`` directly (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``), the per-input-channel factor is

    s_j = max|X_j|^alpha / max_i max_rows |W_i[:, j]|^(1 - alpha)

with ``max|X_j|`` from the calibration pass. The norm's output is divided by ``s`` (its weight, and bias, divided)
and every ``W_i``'s column ``j`` multiplied by it: the model computes the same function, but its activations are
flatter and quantize per token or tensor with less error. ``alpha`` (the strength) is 0.5 in the paper, 0.8 in
llm-compressor's W8A8 examples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

__all__ = ["fold_into_norm", "smoothing_factors"]

logger = logging.getLogger(__name__)

_FLOOR = 1e-5


def smoothing_factors(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], strength: float) -> torch.Tensor:
    """The factors ``s`` (fp32, ``[in_features]``) of one norm's linears; 1 where an input never moved or a
    column is all zeros (nothing to balance)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"SmoothQuant strength must be in [0, 1], got {strength}")
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float().to(act_absmax.device) for w in weights]).amax(dim=0)
    act = act_absmax.float()
    factors = act.clamp(min=_FLOOR).pow(strength) / w_absmax.clamp(min=_FLOOR).pow(1.0 - strength)
    usable = (act > 0) & (w_absmax > 0) & torch.isfinite(factors)
    return torch.where(usable, factors.clamp(min=_FLOOR), torch.ones_like(factors))


@torch.no_grad()
def fold_into_norm(norm: torch.nn.Module, linears: Sequence[torch.nn.Linear], factors: torch.Tensor) -> bool:
    """Divide ``norm``'s output by ``factors`` (through its weight and bias) and multiply the linears' input
    columns by them. The norm's new output is checked on a probe input: a norm that does not scale its output by
    its weight (Gemma's ``1 + weight``, one without weight) is left as it was, and False returned."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != factors.shape[0]:
        return False
    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    before = norm(probe).float()
    saved = {name: p.detach().clone() for name, p in norm.named_parameters(recurse=False)}
    scale = factors.to(device=weight.device)
    weight.div_(scale.to(weight.dtype))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(scale.to(bias.dtype))
    after = norm(probe).float()
    tolerance = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(after * scale.float(), before, rtol=tolerance, atol=tolerance * before.abs().max().item()):
        for name, value in saved.items():
            getattr(norm, name).copy_(value)
        return False
    for linear in linears:
        linear.weight.mul_(scale.to(linear.weight.dtype))
    return True
