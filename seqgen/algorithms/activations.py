"""Quantized activations: a static input scale from the calibration pass, and fake quantization of a linear's input.

A W8A8 linear at inference quantizes its input before the matmul: per token with a scale taken from that token
(dynamic), or per tensor with the ``input_scale`` stored in the checkpoint (static). :func:`quantize_inputs`
simulates that on a model whose weights are the dequantized quantized ones, so the outputs that reach the next
subgraph (error propagation) and the in-memory model's logits are those a quantized checkpoint computes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from .base import FP8_MAX, ActivationScheme, QuantizedWeight, QuantScheme
from .observer import ActivationObserver

__all__ = ["add_input_scales", "fake_quantize", "quantize_inputs", "static_input_scale"]

_TINY = torch.finfo(torch.float32).tiny


def static_input_scale(observer: ActivationObserver, scheme: ActivationScheme) -> torch.Tensor:
    """The per-tensor input scale (fp32, shape ``[1]``): the largest input magnitude the calibration pass saw,
    mapped onto the largest code (llm-compressor's ``static_minmax`` observer)."""
    return (observer.absmax.amax() / scheme.scale_divisor).clamp(min=_TINY).reshape(1).cpu()


def add_input_scales(
    scheme: QuantScheme, quantized: dict[str, QuantizedWeight], observers: Mapping[str, ActivationObserver]
) -> None:
    """Give each of ``quantized`` its static ``input_scale`` from its observer (a no-op for dynamic or weight-only
    schemes). Experts that no token reached have no observer and get none (saving them refuses)."""
    activations = scheme.activations
    if activations is None or activations.dynamic:
        return
    for name, qweight in quantized.items():
        if name in observers and observers[name].count:
            qweight.input_scale = static_input_scale(observers[name], activations)


def fake_quantize(x: torch.Tensor, scheme: ActivationScheme, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` quantized and dequantized as the linear's input is at inference, in ``x``'s dtype: per token (each
    token's absmax over :attr:`ActivationScheme.scale_divisor`) or per tensor with ``input_scale``."""
    xf = x.float()
    if scheme.dynamic:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / scheme.scale_divisor).clamp_(min=_TINY)
    else:
        assert input_scale is not None, "a static activation scheme needs the linear's input_scale"
        scale = input_scale.to(device=x.device, dtype=torch.float32)
    q = xf / scale
    if scheme.type == "float":
        q = q.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    else:
        q = q.round_().clamp_(-128, 127)
    return q.mul_(scale).to(x.dtype)


@contextmanager
def quantize_inputs(linears: Mapping[str, torch.nn.Module], quantized: Mapping[str, QuantizedWeight]) -> Iterator[None]:
    """Inside the block, each linear of ``linears`` whose :class:`QuantizedWeight` in ``quantized`` has an activation
    scheme sees its input fake-quantized (:func:`fake_quantize`). The others run as they are."""
    handles = []

    def hook(qweight: QuantizedWeight) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            scheme = qweight.scheme.activations
            return (fake_quantize(args[0], scheme, qweight.input_scale), *args[1:])

        return pre_hook

    try:
        for name, module in linears.items():
            qweight = quantized.get(name)
            if qweight is not None and qweight.scheme.activations is not None:
                handles.append(module.register_forward_pre_hook(hook(qweight)))
        yield
    finally:
        for handle in handles:
            handle.remove()
