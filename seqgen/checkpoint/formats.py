"""Which compressed-tensors format a quantized weight is stored in, its tensors there, and its config fields.

- ``pack-quantized``: integer weight-only schemes (W4A16, W8A16): codes packed into int32 (``packing.py``).
- ``int-quantized``: integer weights with quantized activations (W8A8): ``weight`` int8 ``[out, in]``,
  ``weight_scale`` ``[out, groups]``, ``weight_zero_point`` when asymmetric.
- ``float-quantized``: FP8 E4M3 weights (FP8, FP8_DYNAMIC): ``weight`` float8_e4m3fn ``[out, in]``,
  ``weight_scale`` ``[out, 1]`` per channel or ``[1]`` per tensor.
- ``nvfp4-pack-quantized``: FP4 E2M1 weights (NVFP4A16): ``weight_packed`` uint8 ``[out, in / 2]``, ``weight_scale``
  float8_e4m3fn ``[out, in / 16]``, ``weight_global_scale`` fp32 ``[1]``.

Static activation schemes add the linear's ``input_scale`` (``[1]``). Scales are stored in the weight's dtype, as
llm-compressor does (tests/data/schemes holds its manifests, tests/test_scheme_layouts.py compares).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import SeqgenError
from .packing import PACK_FORMAT, pack_weight, quantization_args

if TYPE_CHECKING:
    from ..algorithms.base import QuantizedWeight, QuantScheme

__all__ = [
    "INT_FORMAT",
    "FLOAT_FORMAT",
    "NVFP4_FORMAT",
    "MIXED_FORMAT",
    "checkpoint_format",
    "scheme_fields",
    "weight_tensors",
]

INT_FORMAT = "int-quantized"
FLOAT_FORMAT = "float-quantized"
NVFP4_FORMAT = "nvfp4-pack-quantized"
MIXED_FORMAT = "mixed-precision"


def checkpoint_format(scheme: QuantScheme) -> str:
    """The compressed-tensors format llm-compressor saves ``scheme`` in."""
    if scheme.is_fp4:
        return NVFP4_FORMAT
    if scheme.type == "float":
        return FLOAT_FORMAT
    return PACK_FORMAT if scheme.activations is None else INT_FORMAT


def scheme_fields(name: str, qweight: QuantizedWeight) -> dict[str, Any]:
    """The keyword arguments of compressed-tensors' ``QuantizationScheme`` (less its targets) for ``qweight``."""
    from compressed_tensors.quantization import QuantizationArgs

    scheme = qweight.scheme
    weights = quantization_args(name, qweight)
    if scheme.is_fp4:
        weights = weights.model_copy(
            update={"type": "float", "strategy": "tensor_group", "scale_dtype": torch.float8_e4m3fn}
        )
    elif scheme.type == "float" or scheme.per_tensor:
        weights = weights.model_copy(
            update={"type": scheme.type, "strategy": "tensor" if scheme.per_tensor else weights.strategy}
        )
    fields: dict[str, Any] = {"weights": weights, "format": checkpoint_format(scheme)}
    act = scheme.activations
    if act is not None:
        activation: dict[str, Any] = {
            "num_bits": act.bits,
            "type": act.type,
            "symmetric": True,
            "strategy": act.strategy,
            "dynamic": act.dynamic,
        }
        if not act.dynamic:
            activation["observer"] = "static_minmax"
        fields["input_activations"] = QuantizationArgs(**activation)
    return fields


def weight_tensors(name: str, qweight: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors that replace linear ``name``'s ``weight`` in a compressed checkpoint, keyed by their names under
    the linear; scales in ``dtype`` (the weight's)."""
    scheme = qweight.scheme
    if checkpoint_format(scheme) == PACK_FORMAT:
        tensors = pack_weight(name, qweight, dtype)
    elif scheme.is_fp4:
        tensors = _nvfp4_tensors(qweight)
    else:
        scale = qweight.scale.to(dtype)
        tensors = {
            "weight": qweight.codes.to(scheme.code_dtype).contiguous(),
            "weight_scale": scale[:1, 0].contiguous() if scheme.per_tensor else scale.contiguous(),
        }
        if not scheme.symmetric:
            tensors["weight_zero_point"] = qweight.zero_point.to(torch.int8).contiguous()
    if scheme.activations is not None and not scheme.activations.dynamic:
        if qweight.input_scale is None:
            raise SeqgenError(
                f"{name}: its scheme has static input scales but none was observed (no calibration token reached "
                "it); add calibration samples, use a dynamic activation scheme, or leave it out with --ignore."
            )
        tensors["input_scale"] = qweight.input_scale.reshape(1).to(dtype)
    return tensors


def _nvfp4_tensors(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``weight_packed`` (two FP4 codes a byte, by compressed-tensors' ``pack_fp4_to_uint8``), ``weight_scale``
    (each group's FP8 scale: the stored fp32 scale times the global one, exact in FP8) and ``weight_global_scale``."""
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    global_scale = qweight.global_scale.float().reshape(1).clone()  # gate and up of fused experts share one
    return {
        "weight_packed": pack_fp4_to_uint8(qweight.codes.float()),
        "weight_scale": (qweight.scale.float() * global_scale).to(torch.float8_e4m3fn),
        "weight_global_scale": global_scale,
    }
