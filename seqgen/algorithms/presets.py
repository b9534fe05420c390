"""compressed-tensors' preset schemes (``W4A16``, ``W8A8``, ``FP8_DYNAMIC``, ...) as :class:`QuantScheme` objects.

The presets are compressed-tensors' own (``preset_name_to_scheme``): their ``QuantizationArgs`` are read and turned
into a :class:`QuantScheme`, so a name means here what it means to llm-compressor and vLLM. :func:`scheme_from_args`
takes ``QuantizationArgs`` directly, for a library caller who builds them. Overrides (bits, group size, asymmetric)
apply to the weights after the preset; a combination the checkpoint format cannot hold is refused by QuantScheme.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..choices import Preset
from ..errors import SeqgenError
from .base import ActivationScheme, QuantScheme

__all__ = ["SUPPORTED_PRESETS", "scheme_from_args", "scheme_from_preset"]

#: The presets seqgen can calibrate and save in llm-compressor's layout (compressed-tensors knows more).
SUPPORTED_PRESETS = tuple(Preset.values())

_UNSET: Any = object()


def scheme_from_preset(
    name: str,
    *,
    bits: int | None = None,
    group_size: int | None = _UNSET,
    asym: bool | None = None,
    **fields: Any,
) -> QuantScheme:
    """The :class:`QuantScheme` of compressed-tensors' preset ``name``, with the weights' ``bits``,
    ``group_size`` (None: per channel) and ``asym`` overridden when given; ``fields`` set the other QuantScheme
    fields (grid, observer, act_order, dampening, ...)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    key = name.upper()
    if key not in SUPPORTED_PRESETS:
        raise SeqgenError(
            f"scheme {name!r} is not one seqgen calibrates; use one of {', '.join(SUPPORTED_PRESETS)} "
            "(compressed-tensors' preset names)."
        )
    preset = preset_name_to_scheme(key, ["Linear"])
    scheme = scheme_from_args(preset.weights, preset.input_activations, **fields)
    overrides: dict[str, Any] = {}
    if bits is not None:
        overrides["bits"] = bits
    if group_size is not _UNSET:
        overrides["group_size"] = group_size
        overrides["per_tensor"] = scheme.is_fp4
    if asym is not None:
        overrides["symmetric"] = not asym
    try:
        return dataclasses.replace(scheme, **overrides)
    except ValueError as error:
        raise SeqgenError(f"scheme {key} with {overrides}: {error}") from None


def scheme_from_args(weights: Any, input_activations: Any = None, **fields: Any) -> QuantScheme:
    """A :class:`QuantScheme` from compressed-tensors ``QuantizationArgs`` of the weights and (optionally) of the
    input activations; ``fields`` set the QuantScheme fields that have no counterpart there."""
    strategy = _value(weights.strategy)
    if strategy not in ("group", "channel", "tensor", "tensor_group"):
        raise SeqgenError(
            f"weight strategy {strategy!r} is not supported; seqgen quantizes weights per group, channel or tensor."
        )
    return QuantScheme(
        bits=weights.num_bits,
        type=_value(weights.type),
        symmetric=weights.symmetric,
        group_size=weights.group_size if strategy in ("group", "tensor_group") else None,
        per_tensor=strategy in ("tensor", "tensor_group"),
        activations=None if input_activations is None else _activations(input_activations),
        **fields,
    )


def _activations(args: Any) -> ActivationScheme:
    strategy = _value(args.strategy)
    if strategy not in ("token", "tensor") or not args.symmetric:
        raise SeqgenError(
            f"input activations {strategy!r} (symmetric={args.symmetric}) are not supported; seqgen quantizes "
            "activations symmetric per token (dynamic) or per tensor (static)."
        )
    return ActivationScheme(bits=args.num_bits, type=_value(args.type), strategy=strategy, dynamic=bool(args.dynamic))


def _value(field: Any) -> Any:
    """An enum field's value (compressed-tensors' strategies and types are str enums)."""
    return getattr(field, "value", field)
