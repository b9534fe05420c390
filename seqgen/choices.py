"""The values of the library's string options, as enums; the CLI offers the same values as its choices.

An option accepts a member or its plain string (``CalibrationJob(offload="disk")``); any other value raises
:class:`~seqgen.errors.SeqgenError` naming the option, the value and the choices, instead of meaning the default.
This module imports no torch: the CLI builds its options from it before any command runs.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from .errors import SeqgenError

__all__ = ["Choice", "Offload", "SaveFormat", "DType", "Grid", "Observer", "Preset"]

_C = TypeVar("_C", bound="Choice")


class Choice(str, enum.Enum):  # noqa: UP042 - enum.StrEnum is 3.11+, and seqgen supports 3.10
    """The values of one string option. A member equals its string (``Offload.DISK == "disk"``)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        """The accepted strings, in definition order."""
        return [member.value for member in cls]

    @classmethod
    def parse(cls: type[_C], value: object, option: str) -> _C:
        """``value`` as a member of this enum; raises SeqgenError naming ``option``, ``value`` and the choices."""
        try:
            return cls(value)
        except ValueError:
            raise SeqgenError(f"{option}={value!r} is not a choice: use one of {', '.join(cls.values())}.") from None


class Offload(Choice):
    """Where the weights wait between subgraphs while a model is calibrated."""

    MEMORY = "memory"  # CPU RAM
    DISK = "disk"  # the checkpoint's own safetensors files, read when their subgraph runs


class SaveFormat(Choice):
    """How a quantized model is saved."""

    COMPRESSED = "compressed"  # compressed-tensors: packed integer codes and scales, for vLLM
    FAKE = "fake"  # dequantized weights in the original dtype


class DType(Choice):
    """What the model computes in while it is calibrated or evaluated (GPTQ's statistics and solve stay fp32)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    AUTO = "auto"  # the checkpoint's own (its config's dtype)


class Grid(Choice):
    """How a symmetric integer scale is chosen from a group's weights (see ``seqgen.algorithms.compute_qparams``)."""

    FULL = "full"  # the larger-magnitude extreme maps exactly onto the lowest code: all 2^b levels in use
    MINMAX = "minmax"  # max|w| / ((qmax - qmin) / 2), llm-compressor's and compressed-tensors', for bitwise parity


class Observer(Choice):
    """How far a group's range reaches."""

    MINMAX = "minmax"  # to its extremes
    MSE = "mse"  # to the shrunk range (down to 0.81 of them) that quantizes the group with the least error


class Preset(Choice):
    """compressed-tensors' preset schemes that seqgen calibrates and saves in llm-compressor's layout."""

    W4A16 = "W4A16"  # int4 weights, symmetric, group 128; pack-quantized
    W4A16_ASYM = "W4A16_ASYM"  # the same, asymmetric (zero points): AWQ's usual scheme
    W8A16 = "W8A16"  # int8 weights, group 128; pack-quantized
    W8A8 = "W8A8"  # int8 weights per channel, int8 activations per token (dynamic); int-quantized
    INT8 = "INT8"  # compressed-tensors' other name for W8A8
    FP8 = "FP8"  # FP8 E4M3 weights per tensor, static per-tensor activations; float-quantized
    FP8_DYNAMIC = "FP8_DYNAMIC"  # FP8 E4M3 weights per channel, dynamic per-token activations; float-quantized
    NVFP4A16 = "NVFP4A16"  # FP4 E2M1 weights, FP8 scales per 16, fp32 global scale (RTN); nvfp4-pack-quantized
