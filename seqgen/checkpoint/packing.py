"""One quantized weight in compressed-tensors' ``pack-quantized`` format, and the checks that it can be stored so.

Each quantized Linear stores ``weight_packed`` (its integer codes packed densely into int32 by compressed-tensors'
``pack_to_int32``), ``weight_scale``, ``weight_shape`` and, when asymmetric, ``weight_zero_point`` (packed along the
output dimension). Activation order is stored as ``actorder: "weight"``: compressed-tensors 0.20 removed the
``"group"`` order and its ``weight_g_idx``, so a ``g_idx`` that puts columns in groups out of order (GPTQ's dynamic
groups) is refused; static groups (``g_idx[j] == j // group_size``) are stored like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import SeqgenError

if TYPE_CHECKING:
    from ..algorithms.base import QuantizedWeight

__all__ = ["PACK_FORMAT", "check_groups", "check_layout", "pack_weight", "quantization_args"]

PACK_FORMAT = "pack-quantized"


def check_groups(name: str, module: torch.nn.Linear, qweight: QuantizedWeight) -> int:
    """The number of scale groups; raises when the layout is one compressed-tensors cannot store."""
    return check_layout(name, tuple(module.weight.shape), qweight)


def check_layout(name: str, shape: tuple[int, ...], qweight: QuantizedWeight) -> int:
    """:func:`check_groups` for a weight of ``shape`` ``[out, in]``."""
    scheme = qweight.scheme
    out_features, in_features = shape
    if not 1 <= scheme.bits <= 8:
        raise SeqgenError(f"{name}: {scheme.bits}-bit weights cannot be packed; pack-quantized holds 1 to 8 bits.")
    group_size = scheme.group_size
    if group_size is None or group_size == -1:
        n_groups = 1
    else:
        if in_features % group_size:
            raise SeqgenError(
                f"{name}: in_features {in_features} is not a multiple of group_size {group_size}, which "
                "compressed-tensors requires; use a group size that divides it, per-channel (None), or "
                "save_format='fake'."
            )
        n_groups = in_features // group_size
        if qweight.g_idx is not None:
            natural = torch.arange(in_features, device=qweight.g_idx.device) // group_size
            if not torch.equal(qweight.g_idx.to(torch.int64), natural):
                raise SeqgenError(
                    f"{name}: its g_idx puts columns in groups out of order (activation ordering with dynamic "
                    "groups). compressed-tensors >= 0.20 stores only groups of consecutive columns "
                    "(actorder='weight'); quantize with static groups, or use save_format='fake'."
                )
    expected = (out_features, n_groups)
    if tuple(qweight.scale.shape) != expected:
        raise SeqgenError(f"{name}: scale has shape {tuple(qweight.scale.shape)}, expected {expected} [out, groups].")
    if not scheme.symmetric:
        zero_point = qweight.zero_point
        if zero_point is None or tuple(zero_point.shape) != expected:
            shape = None if zero_point is None else tuple(zero_point.shape)
            raise SeqgenError(f"{name}: asymmetric scheme needs a zero_point of shape {expected}, got {shape}.")
    return n_groups


def quantization_args(name: str, qweight: QuantizedWeight) -> Any:
    """compressed-tensors' ``QuantizationArgs`` of ``qweight``'s scheme."""
    from compressed_tensors.quantization import QuantizationArgs

    scheme = qweight.scheme
    grouped = scheme.group_size is not None and scheme.group_size != -1
    fields: dict[str, Any] = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": bool(scheme.symmetric),
        "strategy": "group" if grouped else "channel",
        "group_size": scheme.group_size if grouped else None,
        "dynamic": False,
    }
    if scheme.act_order:
        # the order only changed how GPTQ visited the columns: the groups stay consecutive, as stored
        fields["actorder"] = "weight"
    return QuantizationArgs(**fields)


def _signed_codes(name: str, values: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Codes (or zero points) as the signed int8 that ``pack_to_int32`` takes: [-2^(b-1), 2^(b-1)-1]."""
    if not symmetric and values.dtype == torch.int8:
        values = values.view(torch.uint8)  # 8-bit unsigned codes may be stored in int8 storage
    values = values.to(torch.int16)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    if values.numel() and (int(values.min()) < low or int(values.max()) > high):
        kind = "symmetric (signed)" if symmetric else "asymmetric (unsigned)"
        raise SeqgenError(
            f"{name}: values in [{int(values.min())}, {int(values.max())}] fall outside the {kind} {bits}-bit range "
            f"[{low}, {high}]; the QuantizedWeight does not match its scheme."
        )
    if not symmetric:
        values = values - (1 << (bits - 1))
    return values.to(torch.int8)


def pack_weight(name: str, qweight: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of linear ``name`` (``weight_packed``, ``weight_scale`` in ``dtype``,
    ``weight_shape``, and ``weight_zero_point`` when asymmetric), keyed by their names under the linear."""
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    scheme = qweight.scheme
    bits = scheme.bits
    tensors = {
        "weight_packed": pack_to_int32(_signed_codes(name, qweight.codes, bits, scheme.symmetric), bits),
        "weight_scale": qweight.scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor(tuple(qweight.codes.shape), dtype=torch.int64),
    }
    if not scheme.symmetric:
        zero_point = _signed_codes(f"{name} zero_point", qweight.zero_point, bits, symmetric=False)
        tensors["weight_zero_point"] = pack_to_int32(zero_point, bits, packed_dim=0)
    return tensors
