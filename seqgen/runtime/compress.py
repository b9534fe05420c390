"""Quantizing a subgraph's linears in place, after its calibration pass: from their statistics (linears that share
them in one call), round-to-nearest for experts no token reached, and the linears that never ran (left as they are).

Each quantized linear's weight becomes its dequantized quantized weight, and the
:class:`~seqgen.algorithms.QuantizedWeight` (on the CPU) is returned for saving. The statistics must be reduced
already (the reduce step of :mod:`seqgen.runtime.steps`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from ..algorithms import Algorithm, QuantizedWeight, QuantScheme, Statistics, quantize_rtn
from ..errors import NumericalError
from ..faults import fault_point

__all__ = ["compress_linears", "never_ran", "round_to_nearest", "warn_never_ran"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def compress_linears(
    algorithm: Algorithm, linears: Mapping[str, torch.nn.Linear], stats: Mapping[str, Statistics | None]
) -> dict[str, QuantizedWeight]:
    """Quantize every linear and write its dequantized weight back.

    Linears that share statistics (q/k/v, gate/up) are quantized in one call on their row-stacked weights when the
    algorithm is ``row_separable``: the same result per linear, one GPTQ factorization and column loop instead of
    three. Statistics are released after their last use. A :class:`NumericalError` (GPTQ: a Hessian with NaN or inf,
    or one that no dampening makes positive definite) is raised again with the names of the linears.
    """
    groups: dict[int, list[str]] = {}
    for name in linears:
        shared = stats[name]
        stackable = algorithm.row_separable and not algorithm.scheme.per_tensor  # a per-tensor scale is per linear
        key = id(shared) if shared is not None and stackable else id(linears[name])
        groups.setdefault(key, []).append(name)
    # Statistics read by one quantize call may be freed inside it; any statistics are freed after their last one.
    uses: dict[int, int] = {}
    for names in groups.values():
        if stats[names[0]] is not None:
            uses[id(stats[names[0]])] = uses.get(id(stats[names[0]]), 0) + 1
    for shared in {id(s): s for s in stats.values() if s is not None}.values():
        shared.single_use = uses.get(id(shared)) == 1
    done: dict[str, QuantizedWeight] = {}
    for names in groups.values():
        weights = [linears[name].weight.data for name in names]
        stacked = weights[0] if len(weights) == 1 else torch.cat([w.to(weights[0].dtype) for w in weights])
        shared = stats[names[0]]
        fault_point("compress")
        try:
            quantized = algorithm.quantize(stacked, shared)
        except NumericalError as exc:  # the algorithm does not know which module it quantizes
            raise NumericalError(f"{', '.join(names)}: {exc}") from None
        if shared is not None:
            uses[id(shared)] -= 1
            if not uses[id(shared)]:
                shared.release()
        for name, part in zip(names, _split_rows(quantized, [w.shape[0] for w in weights]), strict=True):
            module = linears[name]
            module.weight.data.copy_(part.dequantize(module.weight.dtype))
            done[name] = part.to("cpu")
    return {name: done[name] for name in linears}


def _split_rows(quantized: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    """The per-linear pieces of a row-stacked quantized weight (``g_idx`` is per column, so it is shared)."""
    if len(rows) == 1:
        return [quantized]
    codes = quantized.codes.split(rows)
    scales = quantized.scale.split(rows)
    zeros = _split_or_none(quantized.zero_point, rows)
    errors, outputs = _split_or_none(quantized.row_error, rows), _split_or_none(quantized.row_output, rows)
    return [
        QuantizedWeight(
            codes=c.contiguous(),
            scale=s.contiguous(),
            zero_point=None if z is None else z.contiguous(),
            g_idx=quantized.g_idx,
            scheme=quantized.scheme,
            row_error=e,
            row_output=o,
        )
        for c, s, z, e, o in zip(codes, scales, zeros, errors, outputs, strict=True)
    ]


def _split_or_none(rows_first: torch.Tensor | None, rows: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(rows) if rows_first is None else list(rows_first.split(rows))


@torch.no_grad()
def round_to_nearest(scheme: QuantScheme, linears: Mapping[str, torch.nn.Linear]) -> dict[str, QuantizedWeight]:
    """Quantize ``linears`` without statistics, in the calibration's scheme, and write back the dequantized weights."""
    done = {}
    for name, module in linears.items():
        quantized = quantize_rtn(module.weight.data, scheme)
        module.weight.data.copy_(quantized.dequantize(module.weight.dtype))
        done[name] = quantized.to("cpu")
    return done


def never_ran(
    linears: Mapping[str, torch.nn.Linear], stats: Mapping[str, Statistics | None]
) -> tuple[list[str], list[str]]:
    """The linears whose forward never ran in the calibration pass, in two lists. Most stay unquantized (a compressed
    save lists them in ``ignore``): a branch these inputs never take (cross-attention without encoder states) or
    model code that reads the weight itself (Mamba's ``dt_proj``), where a quantized weight would not be what runs.
    Experts (``...experts.<e>...``) that no token reached are the second list: they are quantized round-to-nearest,
    since a layer of quantized and unquantized experts is one that serving engines cannot load."""
    never = [name for name in linears if name not in stats]
    unrouted = [name for name in never if re.search(r"\.experts?\.\d+\.", name)]
    return [name for name in never if name not in unrouted], unrouted


def warn_never_ran(never: list[str], targets: tuple[str, ...], warned: set[str]) -> None:
    """One warning per linear of a target (its name inside the target) that never ran, at its first subgraph;
    ``warned`` holds the names warned about so far (across subgraphs)."""
    inner = sorted({next((name[len(t) + 1 :] for t in targets if name.startswith(f"{t}.")), name) for name in never})
    if set(inner) <= warned:
        return
    warned.update(inner)
    pattern = "|".join(re.escape(name) for name in inner)
    logger.warning(
        "%s never ran during the calibration pass: %s unquantized, here and in every target where %s not run (see "
        "CalibrationResult.unquantized). A branch these inputs do not take, or model code that reads the weight "
        "directly. Pass --ignore '\\.(%s)$' to leave them out knowingly.",
        ", ".join(never),
        "it stays" if len(never) == 1 else "they stay",
        "it does" if len(never) == 1 else "they do",
        pattern,
    )
