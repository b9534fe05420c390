"""GPTQ's column loop as one Triton kernel per run of columns, for CUDA devices.

Inside a block of ``B`` columns GPTQ quantizes one column at a time and pushes its error onto the block's later
columns (:meth:`seqgen.algorithms.gptq.GPTQ.quantize`). Written with torch ops that is about eight small kernels per
column, so on a GPU the loop is bound by kernel launches, not arithmetic: on an H100, SmolLM2-135M spent 85% of its
calibration time there (``bench/gpu_check.sh``). Rows of the weight are independent given ``U`` (the Cholesky factor
of ``H^-1``), so here each program takes a slice of rows, holds that slice of the block (``B x BLOCK_R`` floats) in
registers and runs the whole column loop on it: one launch per run of columns that share their quantization
parameters' source (a block with activation order, a group's part of a block without).

Used when the weight is on a CUDA device and Triton imports; ``SEQGEN_GPTQ_KERNEL=torch`` turns it off (the torch
loop is then used everywhere, e.g. to compare). ``SEQGEN_GPTQ_KERNEL=triton`` with ``TRITON_INTERPRET=1`` runs it on
the CPU in Triton's interpreter, which is how the CPU test suite checks it against the torch loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any

import torch

from ..errors import SeqgenError

__all__ = ["kernel_enabled", "quantize_columns"]

logger = logging.getLogger(__name__)

_ENV = "SEQGEN_GPTQ_KERNEL"
_failed: list[str] = []  # the reason the kernel could not run on this machine, once it failed


@functools.cache
def _kernel() -> Any:
    """The jitted kernel (built on first use: importing Triton costs time and is needed only on CUDA)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gptq_columns(
        w_ptr, u_ptr, scale_ptr, zero_ptr, codes_ptr, err_ptr,
        rows, width, start, stop,
        stride_w, stride_u, stride_s, stride_c, stride_e,
        qmin, qmax,
        HAS_ZERO: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        k = tl.arange(0, BLOCK_B)
        in_rows = r < rows
        in_tile = (k < width)[:, None] & in_rows[None, :]
        tile = tl.load(w_ptr + k[:, None] * stride_w + r[None, :], mask=in_tile, other=0.0)  # W^T[block, rows]
        for i in tl.range(start, stop):
            column = tl.sum(tl.where(k[:, None] == i, tile, 0.0), axis=0)
            scale = tl.load(scale_ptr + i * stride_s + r, mask=in_rows, other=1.0)
            x = tl.math.div_rn(column, scale)
            if HAS_ZERO:
                zero = tl.load(zero_ptr + i * stride_s + r, mask=in_rows, other=0.0)
                x = tl.minimum(tl.maximum(x, qmin - zero), qmax - zero)
            else:
                x = tl.minimum(tl.maximum(x, qmin), qmax)
            # Round half to even, as torch.round: |x| <= 2^8 here, and adding 1.5 * 2^23 leaves no fraction bits.
            q = (x + 12582912.0) - 12582912.0
            if HAS_ZERO:
                q = q + zero
                dequantized = (q - zero) * scale
            else:
                dequantized = q * scale
            tl.store(codes_ptr + i * stride_c + r, q.to(codes_ptr.dtype.element_ty), mask=in_rows)
            err = tl.math.div_rn(column - dequantized, tl.load(u_ptr + i * stride_u + i))
            tl.store(err_ptr + i * stride_e + r, err, mask=in_rows)
            later = (k > i) & (k < width)
            coefficients = tl.load(u_ptr + i * stride_u + k, mask=later, other=0.0)
            tile = tl.where(later[:, None], tile - coefficients[:, None] * err[None, :], tile)
        tl.store(w_ptr + k[:, None] * stride_w + r[None, :], tile, mask=in_tile)

    return gptq_columns


def kernel_enabled(device: torch.device) -> bool:
    """Whether :func:`quantize_columns` runs for tensors on ``device``: CUDA with Triton importable, unless
    ``SEQGEN_GPTQ_KERNEL=torch``; on the CPU only with ``SEQGEN_GPTQ_KERNEL=triton`` and ``TRITON_INTERPRET=1``."""
    choice = os.environ.get(_ENV, "auto")
    if choice not in ("auto", "torch", "triton"):
        raise SeqgenError(f"{_ENV}={choice!r} is not a choice: use auto (the default), torch or triton")
    if choice == "torch" or _failed:
        return False
    if device.type == "cpu" and not (choice == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    if device.type not in ("cuda", "cpu"):
        return False
    try:
        _kernel()
    except ImportError as error:
        if choice == "triton":
            raise SeqgenError(
                f"{_ENV}=triton, but triton does not import ({error}); install triton, or use " "auto"
            ) from error
        return False
    return True


def quantize_columns(
    w1: torch.Tensor,
    u1: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    codes: torch.Tensor,
    err1: torch.Tensor,
    start: int,
    stop: int,
    qmin: int,
    qmax: int,
) -> bool:
    """GPTQ's column steps for columns ``start:stop`` of one block, in place; False if the kernel could not run
    (nothing was changed then, and the caller runs the torch loop; the reason is logged once).

    ``w1`` is the block of ``W^T`` (``[B, rows]``, rows contiguous), ``u1`` the block's ``B x B`` part of ``U``;
    ``codes`` and ``err1`` (``[B, rows]``) receive the codes and the scaled errors of the columns. ``scale`` and
    ``zero`` are ``[rows]`` (one group's parameters for all the columns) or ``[B, rows]`` (one row per column).
    """
    if any(t.stride(-1) != 1 for t in (w1, u1, scale, codes, err1) + (() if zero is None else (zero,))):
        raise ValueError("quantize_columns needs tensors whose last dimension is contiguous")
    rows = w1.shape[1]
    width = w1.shape[0]
    per_column = scale.dim() == 2
    block_r = 32 if rows >= 4096 else 16
    # Triton launches on the current CUDA device: make it the tensors' own (cuda:1 under --device cuda:1).
    on_device = torch.cuda.device(w1.device) if w1.device.type == "cuda" else contextlib.nullcontext()
    try:
        with on_device:
            _kernel()[(-(-rows // block_r),)](
                w1, u1, scale, scale if zero is None else zero, codes, err1,
                rows, width, start, stop,
                w1.stride(0), u1.stride(0), scale.stride(0) if per_column else 0, codes.stride(0), err1.stride(0),
                qmin, qmax,
                HAS_ZERO=zero is not None, BLOCK_B=max(16, 1 << (width - 1).bit_length()), BLOCK_R=block_r,
            )  # fmt: skip
    except Exception as error:  # a compiler or driver that cannot build it: the torch loop does the same steps
        _failed.append(f"{type(error).__name__}: {error}")
        logger.warning(
            "GPTQ's Triton column kernel could not run (%s); using the torch column loop instead", _failed[0]
        )
        return False
    return True
