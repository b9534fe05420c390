"""Quantization schemes, quantized weights, calibration statistics and the algorithm interface.

Quantization maps a weight ``w`` to an integer code ``q`` per element and a float ``scale`` (plus an integer
``zero_point`` when asymmetric) per output channel and group of input columns:

    symmetric:   q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)          w ~ q * s
    asymmetric:  q = clamp(round(w / s) + z, 0, 2^b - 1)                 w ~ (q - z) * s

An :class:`Algorithm` turns a float weight and the :class:`Statistics` collected from the inputs of its linear layer
into a :class:`QuantizedWeight`. Algorithms are registered by name with :func:`register_algorithm` and built with
:func:`get_algorithm`.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from ..choices import Grid, Observer
from ..errors import SeqgenError

__all__ = [
    "GRIDS",
    "OBSERVERS",
    "WEIGHT_TYPES",
    "FP8_MAX",
    "FP4_MAX",
    "round_fp4",
    "ActivationScheme",
    "QuantScheme",
    "QuantizedWeight",
    "Statistics",
    "Algorithm",
    "quantize_rtn",
    "compute_qparams",
    "quantize_codes",
    "distributed_active",
    "ALGORITHMS",
    "register_algorithm",
    "get_algorithm",
]

logger = logging.getLogger(__name__)

#: How a symmetric integer scale is chosen from a group's weights (see :func:`compute_qparams`): ``full`` maps the
#: larger-magnitude extreme exactly onto the most negative code, so all ``2^b`` levels are used; ``minmax`` is
#: compressed-tensors' and llm-compressor's ``max|w| / ((qmax - qmin) / 2)``, bitwise what they compute.
GRIDS = tuple(Grid.values())
#: How far a group's range reaches: ``minmax`` to its extremes; ``mse`` to the fraction of them (1.00, 0.99, ...,
#: 0.81) whose quantized group has the least error, summed as ``|w - q(w)|^2.4`` (the exponent of llm-compressor's
#: MSE observer: between the squared error and the largest one).
OBSERVERS = tuple(Observer.values())
_MSE_SHRINKS = tuple(1 - i / 100 for i in range(20))
FP8_MAX = 448  # the largest finite FP8 E4M3 (float8_e4m3fn) value
FP4_MAX = 6  # the largest FP4 E2M1 value (NVFP4's codes)
_MSE_NORM = 2.4
#: What a code is: an integer, or a value of the FP8 E4M3 (``bits=8``) or FP4 E2M1 (``bits=4``, NVFP4) grid.
WEIGHT_TYPES = ("int", "float")
#: How activation scales are shared: one per token (dynamic), or one per tensor (static, from the calibration pass).
ACTIVATION_STRATEGIES = ("token", "tensor")


@dataclass(frozen=True)
class ActivationScheme:
    """How a quantized linear's input is quantized at inference (compressed-tensors' ``input_activations``).

    ``dynamic`` schemes (per-token) need nothing from calibration; static ones (per-tensor) store an ``input_scale``
    per linear: the calibration pass's largest input magnitude over the top of the grid (a min-max observer, as
    llm-compressor's ``static_minmax``).
    """

    bits: int = 8
    type: str = "float"
    strategy: str = "token"
    dynamic: bool = True

    def __post_init__(self) -> None:
        if self.type not in WEIGHT_TYPES or self.bits != 8:
            raise ValueError(
                f"ActivationScheme supports 8-bit int or float activations, got {self.bits}-bit {self.type}"
            )
        if self.strategy not in ACTIVATION_STRATEGIES:
            raise ValueError(f"ActivationScheme.strategy must be one of {ACTIVATION_STRATEGIES}, got {self.strategy!r}")
        if self.dynamic != (self.strategy == "token"):
            raise ValueError("ActivationScheme: per-token scales are dynamic, per-tensor ones static (dynamic=False)")

    @property
    def scale_divisor(self) -> float:
        """What the largest magnitude is divided by to give the scale: half the code range, as compressed-tensors
        computes it (448 for FP8 E4M3, 127.5 for int8)."""
        return float(FP8_MAX) if self.type == "float" else 127.5


@dataclass(frozen=True)
class QuantScheme:
    """How weights are quantized; shared by all algorithms (the GPTQ fields are ignored by the others)."""

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = True
    act_order: bool = False
    dampening: float = 0.01
    block_size: int = 128
    grid: str = "full"  # symmetric schemes only: one of GRIDS
    observer: str = "minmax"  # one of OBSERVERS
    type: str = "int"  # one of WEIGHT_TYPES: "float" is FP8 E4M3 (bits=8, symmetric)
    # one scale for the whole weight (group_size None: compressed-tensors' "tensor"), or, with FP4 groups, a global
    # fp32 scale over the groups' FP8 scales ("tensor_group": NVFP4)
    per_tensor: bool = False
    activations: ActivationScheme | None = None  # None: weight-only (activations stay in the model's dtype)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantScheme.bits must be an integer in 2..8, got {self.bits!r}")
        if self.type not in WEIGHT_TYPES:
            raise ValueError(f"QuantScheme.type must be one of {WEIGHT_TYPES}, got {self.type!r}")
        if self.type == "float" and (self.bits not in (4, 8) or not self.symmetric):
            raise ValueError(
                f"float weights are symmetric FP8 E4M3 (bits=8) or FP4 E2M1 (bits=4), got bits={self.bits}, "
                f"symmetric={self.symmetric}"
            )
        if self.is_fp4 and (self.group_size is None or not self.per_tensor):
            raise ValueError("FP4 weights are NVFP4: groups (16) of FP8 scales under a global scale (per_tensor=True)")
        if self.per_tensor and self.group_size is not None and not self.is_fp4:
            raise ValueError("QuantScheme.per_tensor takes group_size=None (one scale for the whole weight)")
        if self.activations is not None and not isinstance(self.activations, ActivationScheme):
            raise ValueError(f"QuantScheme.activations must be an ActivationScheme or None, got {self.activations!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(
                f"QuantScheme.group_size={self.group_size!r} is not a group size: use a positive number of columns "
                "per scale, or None for one scale per output channel."
            )
        if not isinstance(self.dampening, (int, float)) or not self.dampening >= 0:
            raise ValueError(f"QuantScheme.dampening must be a float >= 0, got {self.dampening!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"QuantScheme.block_size must be a positive integer, got {self.block_size!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"QuantScheme.grid must be one of {GRIDS}, got {self.grid!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"QuantScheme.observer must be one of {OBSERVERS}, got {self.observer!r}")

    @property
    def is_fp4(self) -> bool:
        """FP4 E2M1 codes (NVFP4)."""
        return self.type == "float" and self.bits == 4

    @property
    def qmin(self) -> int:
        """Smallest code (-448 for FP8 E4M3, -6 for FP4 E2M1)."""
        if self.type == "float":
            return -FP4_MAX if self.is_fp4 else -FP8_MAX
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code (448 for FP8 E4M3, 6 for FP4 E2M1)."""
        if self.type == "float":
            return FP4_MAX if self.is_fp4 else FP8_MAX
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """int8 for signed (symmetric) codes, uint8 for unsigned (asymmetric) ones, so that 8-bit codes fit;
        float8_e4m3fn for FP8 codes, bfloat16 (which holds every FP4 E2M1 value) for FP4 ones."""
        if self.type == "float":
            return torch.bfloat16 if self.is_fp4 else torch.float8_e4m3fn
        return torch.int8 if self.symmetric else torch.uint8

    def n_groups(self, in_features: int) -> int:
        """Number of column groups of a weight with ``in_features`` columns; raises ValueError if they don't fit."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size != 0:
            raise ValueError(
                f"group_size {self.group_size} does not divide in_features {in_features}: "
                f"use a group size that divides {in_features}, or group_size=None for one scale per output channel"
            )
        return in_features // self.group_size

    def effective_group_size(self, in_features: int) -> int:
        """Columns per group (``in_features`` itself for per-channel quantization)."""
        self.n_groups(in_features)
        return in_features if self.group_size is None else self.group_size


def compute_qparams(
    w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) over the last dim of ``w`` (fp32); returns tensors of shape ``w.shape[:-1]``.

    Symmetric, ``grid="full"`` (the default): ``s = -e / 2^(b-1)`` where ``e`` is the group's larger-magnitude
    extreme, signed (the negative one on a tie). ``e`` then maps exactly onto the code ``-2^(b-1)`` and every one of
    the ``2^b`` levels is in use; the scale is negative when ``e`` is positive, which dequantization (``q * s``)
    handles as any scale. Only values of the other sign beyond ``2^(b-1) - 1`` steps are clipped, by at most one
    step. This is llama.cpp's ``Q4_0`` choice, and AutoRound's.

    Symmetric, ``grid="minmax"``: ``s = max|w| / ((qmax - qmin) / 2)`` (``/ 7.5`` at 4 bits), the convention of
    compressed-tensors and llm-compressor, which clips the largest positive value by half a step and leaves the code
    ``-2^(b-1)`` to values of the other sign only.

    Asymmetric: the range ``[min(w, 0), max(w, 0)]`` is spread over ``2^b - 1`` steps and ``z = round(-min / s)``,
    so 0 is exact. A group of zeros gets ``s = 1``.

    With ``observer="mse"`` the extremes above are shrunk, per group, by the factor of ``_MSE_SHRINKS`` whose
    quantized group has the least ``|w - q(w)|^2.4``: clipping a few outliers buys a finer step for the rest.

    ``scale_dtype`` is the dtype the scale will be stored in (the weight's): the scale is rounded to it here, so the
    codes, the algorithm's error feedback and the in-memory dequantized weights all use the value a loader (vLLM,
    compressed-tensors) reads back. Rounding bf16 scales only at save time would make the reloaded weights differ.
    """
    if scheme.is_fp4:
        raise SeqgenError(
            "NVFP4 (FP4 weights under a global scale) is quantized round-to-nearest only so far: use algorithm 'rtn'."
        )
    if scheme.observer == "minmax":
        return _range_qparams(w, scheme, scale_dtype, 1.0)
    best = _range_qparams(w, scheme, scale_dtype, _MSE_SHRINKS[0])
    best_error = _group_error(w, *best, scheme)
    for shrink in _MSE_SHRINKS[1:]:
        scale, zero = _range_qparams(w, scheme, scale_dtype, shrink)
        error = _group_error(w, scale, zero, scheme)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = (
            torch.where(better, scale, best[0]),
            None if zero is None else torch.where(better, zero, best[1]),
        )
    return best


def _group_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """``sum |w - q(w)|^2.4`` over the last dim: how well ``scale`` and ``zero`` quantize each group."""
    zero = None if zero is None else zero.unsqueeze(-1)
    q = quantize_codes(w, scale.unsqueeze(-1), zero, scheme)
    dequantized = q.mul_(scale.unsqueeze(-1)) if zero is None else q.sub_(zero).mul_(scale.unsqueeze(-1))
    return dequantized.sub_(w).abs_().pow_(_MSE_NORM).sum(dim=-1)


def _range_qparams(
    w: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype | None, shrink: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`compute_qparams` of the range of ``w`` shrunk by ``shrink`` (1.0: the min-max range)."""
    if scheme.per_tensor:  # one scale for every row (the callers pass whole rows)
        scale = w.abs().amax().expand(w.shape[:-1]) * shrink / scheme.qmax
    elif scheme.type == "float":  # llm-compressor's: the largest magnitude onto the largest finite value
        scale = w.abs().amax(dim=-1) * shrink / scheme.qmax
    elif scheme.symmetric and scheme.grid == "full":
        hi, lo = w.amax(dim=-1), w.amin(dim=-1)
        scale = torch.where(-lo >= hi, lo, hi) * shrink / scheme.qmin
    elif scheme.symmetric:
        scale = w.abs().amax(dim=-1) * shrink / ((scheme.qmax - scheme.qmin) / 2)
    else:
        lo = w.amin(dim=-1).clamp(max=0) * shrink
        scale = (w.amax(dim=-1).clamp(min=0) * shrink - lo) / scheme.qmax
    if scale_dtype is not None and scale_dtype != scale.dtype:
        scale = scale.to(scale_dtype).to(scale.dtype)
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    if scheme.symmetric:
        return scale, None
    return scale, torch.round(-lo / scale).clamp(scheme.qmin, scheme.qmax)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Codes (as fp32 values) of ``w`` given broadcastable ``scale`` and ``zero``, in one new tensor: integers, or
    FP8 E4M3 values for float schemes (round to nearest even on that grid, saturating at +-448)."""
    if scheme.is_fp4:
        return round_fp4(torch.div(w, scale))
    if scheme.type == "float":
        return torch.div(w, scale).clamp_(scheme.qmin, scheme.qmax).to(torch.float8_e4m3fn).float()
    q = torch.div(w, scale).round_()
    if zero is not None:
        q.add_(zero)
    return q.clamp_(scheme.qmin, scheme.qmax)


def round_fp4(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) rounded to the nearest FP4 E2M1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives),
    saturating at +-6, in place; the steps are 0.5 below 2, 1 below 4 and 2 above."""
    magnitude = x.abs().clamp_(max=FP4_MAX)
    step = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
    return magnitude.div_(step).round_().mul_(step).copysign_(x)


@dataclass
class QuantizedWeight:
    """Integer codes and per-group quantization parameters of one ``[out_features, in_features]`` weight.

    ``scale``/``zero_point`` have one column per group. Column ``j`` of the weight belongs to group ``g_idx[j]``;
    ``g_idx`` is None unless the algorithm reordered columns (GPTQ with ``act_order``), meaning ``j // group_size``
    (or group 0 for per-channel quantization).

    An algorithm that knows the layer's inputs may also give, per output row, ``row_error`` = ``||(w - q) X||^2`` and
    ``row_output`` = ``||w X||^2`` over the calibration inputs ``X`` (in one norm, e.g. GPTQ's dampened Hessian):
    :meth:`relative_error` is then the reconstruction error of the layer's output.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    g_idx: torch.Tensor | None
    scheme: QuantScheme
    #: static activation schemes: the scale of the linear's input (fp32, one element), from the calibration pass
    input_scale: torch.Tensor | None = None
    #: NVFP4: the fp32 global scale (``scale * global_scale`` is each group's FP8 scale as stored)
    global_scale: torch.Tensor | None = None
    row_error: torch.Tensor | None = None
    row_output: torch.Tensor | None = None

    def relative_error(self) -> float | None:
        """``||(W - Q) X||^2 / ||W X||^2`` over all rows, or None when the algorithm did not measure it."""
        if self.row_error is None or self.row_output is None:
            return None
        output = float(self.row_output.double().sum())
        return float(self.row_error.double().sum()) / output if output > 0 else 0.0

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def group_index(self) -> torch.Tensor:
        """Group of every input column (int64 ``[in_features]``), whether or not ``g_idx`` is stored."""
        if self.g_idx is not None:
            return self.g_idx.long()
        group = self.scheme.effective_group_size(self.in_features)
        return torch.arange(self.in_features, device=self.codes.device) // group

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(q - z) * s`` that the codes stand for, ``[out_features, in_features]``."""
        q = self.codes.to(torch.float32, copy=True)  # modified in place below
        group = self.scheme.effective_group_size(self.in_features)
        natural = torch.arange(self.in_features, device=q.device) // group if self.g_idx is not None else None
        if natural is None or torch.equal(self.g_idx.long(), natural):
            # consecutive groups: parameters broadcast over a [rows, groups, group] view, in place
            view = q.view(self.out_features, -1, group)
            if self.zero_point is not None:
                view.sub_(self.zero_point.float().unsqueeze(-1))
            view.mul_(self.scale.float().unsqueeze(-1))
        else:
            idx = self.g_idx.long()
            if self.zero_point is not None:
                q.sub_(self.zero_point.float()[:, idx])
            q.mul_(self.scale.float()[:, idx])
        return q.to(dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy with every tensor on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            codes=self.codes.to(device),
            scale=self.scale.to(device),
            zero_point=move(self.zero_point),
            g_idx=move(self.g_idx),
            row_error=move(self.row_error),
            row_output=move(self.row_output),
            input_scale=move(self.input_scale),
            global_scale=move(self.global_scale),
        )


def quantize_rtn(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round-to-nearest: per group min/max (asymmetric) or absmax (symmetric) parameters, each element rounded alone.

    Every element's error is at most half its group's scale.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    n_groups = scheme.n_groups(in_features)
    w = weight.detach().float().reshape(out_features, n_groups, in_features // n_groups)
    if scheme.is_fp4:
        return _quantize_nvfp4(w, scheme)
    scale, zero = compute_qparams(w, scheme, weight.dtype)
    codes = quantize_codes(w, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), scheme)
    return QuantizedWeight(
        codes=codes.reshape(out_features, in_features).to(scheme.code_dtype),
        scale=scale,
        zero_point=None if zero is None else zero.to(torch.int32),
        g_idx=None,
        scheme=scheme,
    )


def _quantize_nvfp4(w: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """NVFP4 round-to-nearest of ``w`` ``[out, groups, group]`` (fp32), as compressed-tensors computes it: the
    global scale ``448 * 6 / max|w|`` spreads the groups' scales over FP8's range; each group's FP8 scale is
    ``global * max|group| / 6`` rounded to FP8 (its smallest step where 0), and its codes are FP4 E2M1 values of
    ``w / (fp8_scale / global)``."""
    amax = w.abs().amax()
    global_scale = (FP8_MAX * FP4_MAX / amax if amax > 0 else torch.ones_like(amax)).reshape(1)
    fp8 = (w.abs().amax(dim=-1) / FP4_MAX * global_scale).to(torch.float8_e4m3fn).float()
    fp8 = torch.where(fp8 == 0, torch.finfo(torch.float8_e4m3fn).eps, fp8)
    scale = fp8 / global_scale
    codes = round_fp4(w / scale.unsqueeze(-1))
    return QuantizedWeight(
        codes=codes.reshape(w.shape[0], -1).to(scheme.code_dtype),
        scale=scale,
        zero_point=None,
        g_idx=None,
        scheme=scheme,
        global_scale=global_scale,
    )


def distributed_active() -> bool:
    """True when statistics must be summed over processes (torch.distributed is initialized)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Statistics(abc.ABC):
    """Per-group-of-linears calibration statistics, accumulated from module inputs.

    The runtime shares ONE Statistics object between linears that read the same input tensor (q/k/v projections,
    gate/up), so e.g. the Hessian is computed once. Call :meth:`update` for every calibration batch, then
    :meth:`reduce_` once before quantizing.
    """

    @abc.abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Accumulate the inputs ``x`` ``[..., in_features]`` (any float dtype; padded tokens already removed)."""

    @abc.abstractmethod
    def reduce_(self) -> None:
        """Combine the statistics of all processes in place if torch.distributed is initialized; else no-op.

        This is the only place where statistics cross processes.
        """

    @abc.abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that restore these statistics bitwise with :meth:`load_state_dict` (references, not copies)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore statistics saved by :meth:`state_dict` (copied into this object's own tensors)."""

    #: Set by the calibration loop when these statistics feed exactly one :meth:`Algorithm.quantize` call: the
    #: algorithm may then :meth:`release` them as soon as it has derived what it needs (GPTQ: once the Hessian is
    #: factored), which lowers the memory peak of the largest layers.
    single_use: bool = False

    def scale_inputs_(self, factors: torch.Tensor) -> None:
        """Turn these statistics into those of the inputs divided by ``factors`` ``[in_features]`` per channel, in
        place: what SmoothQuant's folding does to the inputs after they were collected."""
        raise SeqgenError(
            f"{type(self).__name__} cannot be rescaled for SmoothQuant (no scale_inputs_); implement it, or "
            "calibrate without --smoothquant."
        )

    def release(self) -> None:  # noqa: B027 (optional to override: the default keeps the tensors)
        """Free the accumulated tensors; the statistics cannot be used afterwards. The default keeps them."""


class Algorithm(abc.ABC):
    """A weight quantization algorithm: optional calibration statistics in, :class:`QuantizedWeight` out."""

    name: ClassVar[str]
    # True when every output row is quantized on its own given the statistics (per-row groups, no per-tensor
    # parameters): then quantizing weights that share statistics stacked row-wise (q/k/v, gate/up) gives each
    # the result it would get alone, and the runtime makes one call for the stack.
    row_separable: ClassVar[bool] = False

    def __init__(self, scheme: QuantScheme) -> None:
        if not isinstance(scheme, QuantScheme):
            raise TypeError(f"{type(self).__name__} expects a QuantScheme, got {type(scheme).__name__}")
        self.scheme = scheme

    def new_statistics(self, in_features: int, device: torch.device) -> Statistics | None:
        """Fresh statistics for a linear with ``in_features`` inputs, or None if the algorithm needs no data."""
        return None

    @abc.abstractmethod
    def quantize(self, weight: torch.Tensor, stats: Statistics | None) -> QuantizedWeight:
        """Quantize ``weight`` ``[out, in]`` (not modified in place) using the statistics of its inputs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scheme})"


ALGORITHMS: dict[str, type[Algorithm]] = {}

_A = TypeVar("_A", bound=type[Algorithm])


def register_algorithm(cls: _A) -> _A:
    """Class decorator: make ``cls`` available to :func:`get_algorithm` under ``cls.name``.

    Registering a second, different class under a taken name raises ValueError; re-registering the same class (same
    module and qualified name, e.g. a reloaded module) replaces it.
    """
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"register_algorithm expects an Algorithm subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty class attribute `name` to be registered")
    old = ALGORITHMS.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"algorithm name {name!r} is already taken by {old.__module__}.{old.__qualname__}; "
            f"give {cls.__qualname__} another name"
        )
    ALGORITHMS[name] = cls
    logger.debug("registered algorithm %r: %s.%s", name, cls.__module__, cls.__qualname__)
    return cls


def get_algorithm(name: str, scheme: QuantScheme) -> Algorithm:
    """The registered algorithm ``name`` set up for ``scheme``."""
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS)) or "(none)"
        raise SeqgenError(
            f"unknown quantization algorithm {name!r}; known algorithms: {known}. "
            "Register a custom one with seqgen.algorithms.register_algorithm."
        ) from None
    return cls(scheme)
