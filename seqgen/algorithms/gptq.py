"""GPTQ (Frantar et al., 2022): quantize columns one at a time and push each column's error onto the columns not yet
quantized, using the inverse Hessian of the layer's reconstruction loss.

For a linear with inputs ``X`` (``N`` tokens) the loss ``||X W^T - X Q^T||^2`` has Hessian ``H = 2/N * sum x x^T``
with respect to each row of ``W``. Quantizing column ``j`` to ``q_j`` with error ``e = (w_j - q_j) / [H^-1]_jj``
and updating the remaining columns ``W[:, j+1:] -= e [H^-1]_{j, j+1:}`` is the optimal (OBS) compensation. With the
upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) the rows of ``U`` hold exactly these update coefficients
after the earlier columns are eliminated, so one factorization serves all columns. Columns are processed in blocks:
updates inside a block are applied column by column, the rest of the matrix gets the whole block's errors in one
matmul (lazy batch updates).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ..errors import NumericalError, SeqgenError
from .base import (
    Algorithm,
    QuantizedWeight,
    QuantScheme,
    Statistics,
    compute_qparams,
    distributed_active,
    quantize_codes,
    register_algorithm,
)
from .gptq_kernel import kernel_enabled, quantize_columns

__all__ = ["GPTQ", "HessianStatistics"]

logger = logging.getLogger(__name__)

# Retries of the Cholesky factorization, each with ten times the previous dampening.
_CHOLESKY_RETRIES = 3
# Rows per step when a large matrix is copied or reordered, so that the copy needs no full-size temporary.
_ROWS_PER_COPY = 256
# Elements per triangular solve of _row_outputs: fewer rows a call are several times slower on the CPU.
_SOLVE_ELEMENTS = 1 << 24


class HessianStatistics(Statistics):
    """``H = 2/N * sum x x^T`` (fp32, ``[in_features, in_features]``) over all ``N`` tokens seen.

    ``update`` adds ``X^T X`` to a raw fp32 sum, and only the blocks on and above the diagonal: with the inputs split
    into four column blocks that is 10 of 16 blocks, so the accumulation, the largest cost of calibration after the
    forward passes, does 37% fewer FLOPs than a full ``X^T X`` and runs as a few large matmuls. The symmetric
    Hessian is assembled once, when :attr:`hessian` is read.

    With ``dtype=torch.float64`` each batch's ``X^T X`` is still computed in fp32, but summed in fp64: sums of a few
    hundred fp32 products are then exact but for entries that cancel to far below the others, so the rounded fp32
    Hessian does not depend on the order of the batches, and a run split over processes (torchrun) gives the
    single-process Hessian bitwise. It costs twice the memory of the statistics and an fp32 temporary per batch.
    """

    _MIN_BLOCKED = 256  # narrower inputs are accumulated as one matmul

    def __init__(self, in_features: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        self.in_features = in_features
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.nsamples = 0
        self._reduced = False
        self._released = False
        n_blocks = 4 if in_features >= self._MIN_BLOCKED else 1
        width = -(-in_features // (8 * n_blocks)) * 8  # a multiple of 8 columns
        self._bounds = [(start, min(start + width, in_features)) for start in range(0, in_features, width)]
        # GPTQ's factorization of this Hessian, shared by the linears that read the same input (q/k/v, gate/up)
        self.factors: dict[tuple[float, bool], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}

    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"HessianStatistics expects inputs with last dim {self.in_features}, got shape {tuple(x.shape)}"
            )
        self._check_live("update")
        if self._reduced:
            raise SeqgenError(
                "HessianStatistics.update after reduce_(): the statistics were already summed over processes; "
                "collect all batches first, or start new statistics"
            )
        x = x.detach().reshape(-1, self.in_features).to(device=self.xtx.device, dtype=torch.float32)
        if x.shape[0] == 0:
            return
        self.factors.clear()
        for start, end in self._bounds:
            if self.xtx.dtype == torch.float32:
                self.xtx[start:end, start:].addmm_(x[:, start:end].T, x[:, start:])
            else:  # the batch's product in fp32, summed in the accumulator's dtype
                self.xtx[start:end, start:].add_(x[:, start:end].T @ x[:, start:])
        self.nsamples += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """The full symmetric ``2/N * X^T X`` (a new tensor; zeros before any update)."""
        return self.ordered_hessian(None)

    def ordered_hessian(self, order: torch.Tensor | None) -> torch.Tensor:
        """``2/N * X^T X`` with rows and columns in ``order`` (``H[order][:, order]``), as a new tensor.

        Built a few rows at a time, so the only full-size allocation is the result: for a 5632-input ``down_proj``
        a whole-matrix permutation would add another 127 MB at GPTQ's memory peak. Raises :class:`SeqgenError`
        on non-finite entries.
        """
        self._check_live("ordered_hessian")
        self._mirror()
        n = self.in_features
        scale = 2.0 / max(self.nsamples, 1)
        out = torch.empty(n, n, dtype=torch.float32, device=self.xtx.device)
        for start in range(0, n, _ROWS_PER_COPY):
            end = min(start + _ROWS_PER_COPY, n)
            if order is None:
                rows = self.xtx[start:end]
            else:
                rows = self.xtx.index_select(0, order[start:end]).index_select(1, order)
            torch.mul(rows, scale, out=out[start:end])
            if not torch.isfinite(out[start:end]).all():
                raise NumericalError(
                    "GPTQ Hessian has non-finite values: NaN or inf reach the inputs of this layer in the calibration "
                    "data. Check the checkpoint's weights, or calibrate with --dtype float32"
                )
        return out

    def _mirror(self) -> None:
        """Copy the accumulated upper blocks onto the blocks below the diagonal, in place: ``xtx`` is then the full
        symmetric ``X^T X`` (``update`` keeps adding to the upper blocks only, so this is repeated on each read)."""
        for i, (start, end) in enumerate(self._bounds):
            for later_start, later_end in self._bounds[i + 1 :]:
                self.xtx[later_start:later_end, start:end].copy_(self.xtx[start:end, later_start:later_end].T)

    def scale_inputs_(self, factors: torch.Tensor) -> None:
        """``X^T X`` of the inputs divided by ``factors`` per channel (SmoothQuant): ``X^T X / (f f^T)``."""
        self._check_live("scale_inputs_")
        inverse = factors.to(device=self.xtx.device, dtype=torch.float32).reciprocal()
        self.xtx.mul_(inverse.unsqueeze(1)).mul_(inverse.unsqueeze(0))
        self.factors.clear()

    def release(self) -> None:
        self.xtx = torch.empty(0, dtype=torch.float32, device=self.xtx.device)
        self.factors.clear()
        self._released = True

    def _check_live(self, action: str) -> None:
        if self._released:
            raise SeqgenError(
                f"HessianStatistics: {action} after release(): the statistics were freed after their single use; "
                "leave single_use False to quantize from the same statistics more than once"
            )

    def reduce_(self) -> None:
        """Sum the raw ``X^T X`` and token counts of all processes (one all_reduce each)."""
        self._check_live("reduce_")
        if not distributed_active() or self._reduced:
            return
        count = torch.tensor([float(self.nsamples)], dtype=torch.float64, device=self.xtx.device)
        torch.distributed.all_reduce(count)
        torch.distributed.all_reduce(self.xtx)
        self.nsamples = int(count.item())
        self._reduced = True
        self.factors.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._check_live("state_dict")
        return {"xtx": self.xtx, "nsamples": torch.tensor(self.nsamples, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict`; ``xtx`` may also be a full symmetric ``X^T X`` (only its upper blocks are
        read)."""
        self._check_live("load_state_dict")
        xtx = state["xtx"]
        if tuple(xtx.shape) != tuple(self.xtx.shape):
            raise ValueError(f"X^T X of shape {tuple(xtx.shape)} does not fit statistics of {self.in_features} inputs")
        self.xtx.copy_(xtx)
        self.nsamples = int(state["nsamples"])
        self._reduced = False
        self.factors.clear()


def _row_outputs(weight: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """``||w X||^2`` per row of ``weight`` in the norm GPTQ's error is measured in (the dampened Hessian
    ``H = (U^T U)^-1``, columns in ``perm``'s order): ``||w U^-1||^2``, one triangular solve a few rows at a time.

    GPTQ's column errors ``E`` satisfy ``W - Q = E U``, so ``||E||^2`` per row (the loss it accumulates) is
    ``||(w - q) X||^2`` in the same norm, and the ratio of the two is the layer's relative output error.
    """
    norms = torch.empty(weight.shape[0], dtype=torch.float32, device=u.device)
    step = max(_ROWS_PER_COPY, _SOLVE_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        rows = weight[start : start + step].to(device=u.device, dtype=torch.float32)
        rows = rows.masked_fill(dead, 0.0)  # as GPTQ zeroes them: inputs that were always zero
        if perm is not None:
            rows = rows.index_select(1, perm)
        solved = torch.linalg.solve_triangular(u, rows, upper=True, left=False)
        norms[start : start + rows.shape[0]] = solved.square().sum(dim=1)
    return norms


def _all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()`` a few rows at a time (no full-size boolean temporaries)."""
    return all(bool(torch.isfinite(t[i : i + _ROWS_PER_COPY]).all()) for i in range(0, t.shape[0], _ROWS_PER_COPY))


@register_algorithm
class GPTQ(Algorithm):
    """GPTQ with lazy batch updates, optional activation order and group-wise parameters.

    Uses ``scheme.dampening`` (fraction of ``mean(diag(H))`` added to the diagonal), ``scheme.block_size`` (columns
    per lazy batch) and ``scheme.act_order`` (columns by descending ``diag(H)``). With activation order the groups
    are *static*: each group of consecutive original columns gets its scale/zero from the weights before any update,
    and keeps it whatever order its columns are visited in. So ``g_idx`` is ``column // group_size``, the layout that
    compressed-tensors (``actorder="weight"``) and vLLM store; dynamic groups would scatter a group's columns.
    On CUDA the column loop inside a block runs as one Triton kernel (:mod:`seqgen.algorithms.gptq_kernel`).
    """

    name = "gptq"
    row_separable = True
    #: what :class:`HessianStatistics` sum batches in: float64 makes the sum independent of the batches' order
    hessian_dtype: torch.dtype = torch.float32

    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__(scheme)
        if scheme.is_fp4:
            raise SeqgenError("GPTQ does not quantize NVFP4 (FP4 under a global scale) yet; use algorithm 'rtn'.")

    def new_statistics(self, in_features: int, device: torch.device) -> Statistics | None:
        return HessianStatistics(in_features, device, self.hessian_dtype)

    def quantize(self, weight: torch.Tensor, stats: Statistics | None) -> QuantizedWeight:
        if not isinstance(stats, HessianStatistics):
            raise SeqgenError(
                f"GPTQ needs the HessianStatistics from GPTQ.new_statistics, got {type(stats).__name__}; "
                "run calibration batches through the layer before quantizing it"
            )
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
        rows, cols = weight.shape
        if stats.in_features != cols:
            raise ValueError(f"weight has {cols} input columns but the statistics have {stats.in_features}")
        if stats.nsamples == 0:
            raise SeqgenError("GPTQ statistics saw no tokens: feed calibration batches before quantizing")
        stats._check_live("quantize")
        scheme = self.scheme
        group = scheme.effective_group_size(cols)
        started = time.perf_counter()

        dead, perm, u = self._factor(stats)
        device = u.device
        if stats.single_use:
            stats.release()  # only U is used from here on: X^T X goes before the copies of the weight are made
        row_output = _row_outputs(weight, dead, perm, u)  # its temporaries are gone before the copies are made
        # Work on W^T ([cols, rows], contiguous): a weight column is then a contiguous row, which keeps the
        # per-column steps and in-block updates cache friendly. Always a fresh buffer: `weight` is never modified.
        # With activation order its rows are gathered in that order straight away (no second full copy).
        wt = torch.empty(cols, rows, dtype=torch.float32, device=device)
        source = weight.detach().T
        for start in range(0, cols, _ROWS_PER_COPY):
            end = min(start + _ROWS_PER_COPY, cols)
            wt[start:end] = source[start:end] if perm is None else source.index_select(0, perm[start:end])
        wt[dead if perm is None else dead[perm]] = 0.0
        n_groups = cols // group
        static_group: list[int] = []
        if perm is not None:
            position = torch.argsort(perm)  # where each original column sits in wt
            static = [
                compute_qparams(wt[position[g * group : (g + 1) * group]].T, scheme, weight.dtype)
                for g in range(n_groups)
            ]
            static_group = (perm // group).tolist()

        codes_t = torch.empty(cols, rows, dtype=scheme.code_dtype, device=device)
        scales = torch.empty(n_groups, rows, dtype=torch.float32, device=device)
        zeros = None if scheme.symmetric else torch.empty(n_groups, rows, dtype=torch.float32, device=device)
        loss = torch.zeros(rows, dtype=torch.float32, device=device)
        scale = zero = None

        kernel = kernel_enabled(device) and scheme.type == "int"  # the kernel rounds to integers
        static_scales = static_zeros = None
        if perm is not None and kernel:  # the kernel reads each column's parameters from one [cols, rows] gather
            static_scales = torch.stack([scale for scale, _ in static])
            static_zeros = None if scheme.symmetric else torch.stack([zero for _, zero in static])
            column_group = torch.tensor(static_group, device=device)
        for i1 in range(0, cols, scheme.block_size):
            i2 = min(i1 + scheme.block_size, cols)
            w1 = wt[i1:i2]  # a view: updated in place
            err1 = torch.empty_like(w1)
            u1 = u[i1:i2, i1:i2]
            i = 0
            while i < i2 - i1:  # runs of columns that share where their parameters come from
                j = i1 + i
                if perm is not None:
                    stop = i2 - i1
                else:
                    if j % group == 0:
                        scale, zero = self._group_params(wt, err1, u, i1, i2, i, group, weight.dtype)
                        scales[j // group] = scale
                        if zeros is not None:
                            zeros[j // group] = zero
                    stop = min(i2 - i1, i + group - j % group)
                if kernel:
                    if perm is not None:
                        run_scale = static_scales.index_select(0, column_group[i1:i2])
                        run_zero = None if static_zeros is None else static_zeros.index_select(0, column_group[i1:i2])
                    else:
                        run_scale, run_zero = scale, zero
                    kernel = quantize_columns(
                        w1, u1, run_scale, run_zero, codes_t[i1:i2], err1, i, stop, scheme.qmin, scheme.qmax
                    )
                if not kernel:
                    self._columns(
                        w1,
                        u1,
                        err1,
                        codes_t[i1:i2],
                        i,
                        stop,
                        (scale, zero) if perm is None else [static[g] for g in static_group[i1:i2]],
                    )
                i = stop
            loss.add_(err1.square().sum(dim=0))
            # Lazy batch update: the whole block's errors reach the remaining columns in one matmul.
            if i2 < cols:
                wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)

        g_idx: torch.Tensor | None = None
        if perm is not None:
            codes_t = codes_t[position]
            for g, (scale, zero) in enumerate(static):
                scales[g] = scale
                if zeros is not None:
                    zeros[g] = zero
            g_idx = (torch.arange(cols, device=device) // group).to(torch.int32)

        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "gptq %dx%d: proxy loss %.6g in %.3fs",
                rows,
                cols,
                0.5 * loss.sum().item(),
                time.perf_counter() - started,
            )
        out_device = weight.device
        return QuantizedWeight(
            codes=codes_t.T.contiguous().to(out_device),
            scale=scales.T.contiguous().to(out_device),
            zero_point=None if zeros is None else zeros.T.to(torch.int32).contiguous().to(out_device),
            g_idx=None if g_idx is None else g_idx.to(out_device),
            scheme=scheme,
            row_error=loss.to(out_device),
            row_output=row_output.to(out_device),
        )

    def _columns(
        self,
        w1: torch.Tensor,
        u1: torch.Tensor,
        err1: torch.Tensor,
        codes: torch.Tensor,
        start: int,
        stop: int,
        params: tuple[torch.Tensor, torch.Tensor | None] | list[tuple[torch.Tensor, torch.Tensor | None]],
    ) -> None:
        """The column steps of columns ``start:stop`` of a block (``w1``, ``W^T`` rows), in place, with torch ops:
        quantize the column, keep its scaled error, push the error onto the block's later columns. ``params`` is
        one ``(scale, zero)`` for all the columns, or one per column of the block."""
        # Per column views and U's diagonal as Python floats: the column step is the sequential core of GPTQ, and
        # on either device its cost is the number of ops it dispatches (see gptq_kernel for CUDA).
        columns, errors, codes_of = w1.unbind(0), err1.unbind(0), codes.unbind(0)
        diagonal = u1.diagonal().tolist()
        width = w1.shape[0]
        for i in range(start, stop):
            scale, zero = params[i] if isinstance(params, list) else params
            col, err = columns[i], errors[i]
            q = quantize_codes(col, scale, zero, self.scheme)
            codes_of[i].copy_(q)
            q = q.sub_(zero).mul_(scale) if zero is not None else q.mul_(scale)  # dequantized
            torch.sub(col, q, out=err).div_(diagonal[i])
            # OBS update of the block's later columns: W[:, k] -= err * U[j, k].
            if i + 1 < width:
                w1[i + 1 :].addr_(u1[i, i + 1 :], err, alpha=-1.0)

    def _group_params(
        self,
        wt: torch.Tensor,
        err1: torch.Tensor,
        u: torch.Tensor,
        i1: int,
        i2: int,
        i: int,
        group: int,
        scale_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale/zero of the group starting at column ``j = i1 + i``, from its current error-updated weights.

        ``wt`` is W^T. Columns inside the current block (``i1:i2``) are up to date; columns past the block still
        lack the pending updates from this block's first ``i`` columns, ``U[i1:j, cols]^T @ err1[:i]``, which are
        applied here (on a copy) so the parameters see exactly the weights the columns will have when quantized.
        """
        j = i1 + i
        end = min(j + group, wt.shape[0])
        current = wt[j : min(end, i2)]
        if end > i2:
            ahead = wt[i2:end]
            if i > 0:
                ahead = ahead - u[i1:j, i2:end].T @ err1[:i]
            current = torch.cat([current, ahead], dim=0)
        return compute_qparams(current.T, self.scheme, scale_dtype)

    def _factor(self, stats: HessianStatistics) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Dead inputs, the activation-order permutation (or None) and ``U``, computed once per statistics."""
        key = (self.scheme.dampening, self.scheme.act_order)
        if key not in stats.factors:
            h, dead, perm = self._hessian(stats)
            stats.factors[key] = (dead, perm, self._inverse_cholesky(h, lambda: self._hessian(stats)[0]))
        return stats.factors[key]

    def _hessian(self, stats: HessianStatistics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A fresh Hessian with dead inputs' diagonal set to 1, in activation order; the dead mask; the order."""
        # Inputs that were always zero carry no information: any weight in their column gives the same output.
        diag = stats.xtx.diagonal()
        dead = diag == 0
        perm = None
        if self.scheme.act_order:
            perm = torch.argsort(torch.where(dead, 1.0, diag * (2.0 / stats.nsamples)), descending=True, stable=True)
        h = stats.ordered_hessian(perm)
        h.diagonal()[dead if perm is None else dead[perm]] = 1.0
        return h, dead, perm

    def _inverse_cholesky(self, h: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` with ``lambda = dampening * mean(diag(H))``.

        Everything happens in ``h``'s own buffer (Cholesky, inverse, Cholesky again), so the factorization costs one
        ``n x n`` matrix, not four (127 MB each for a 5632-input ``down_proj``). If a factorization fails, ``h`` is
        rebuilt with ``rebuild`` and the dampening multiplied by 10, up to 3 times.
        """
        mean_diag = h.diagonal().mean().item()
        fraction = self.scheme.dampening
        info = torch.empty((), dtype=torch.int32, device=h.device)
        for attempt in range(_CHOLESKY_RETRIES + 1):
            if attempt:
                h = rebuild()
            # H is symmetric, so its column-major view is the same matrix, and LAPACK works on column-major
            # storage in place; on the row-major tensor each call would copy it first.
            a = h.mT
            a.diagonal().add_(fraction * mean_diag)
            torch.linalg.cholesky_ex(a, out=(a, info))  # H = L L^T
            if info.item() == 0:
                torch.cholesky_inverse(a, out=a)  # H^-1 from L
                torch.linalg.cholesky_ex(a, out=(a, info))  # H^-1 = L' L'^T; row-major, the buffer holds L'^T = U
                if info.item() == 0 and _all_finite(h):
                    if attempt:
                        logger.warning("gptq: Cholesky succeeded with dampening %.3g", fraction)
                    return h
            if attempt < _CHOLESKY_RETRIES:
                new_fraction = fraction * 10 if fraction > 0 else 1e-3
                logger.warning(
                    "gptq: Hessian is not positive definite with dampening %.3g; retrying with %.3g",
                    fraction,
                    new_fraction,
                )
                fraction = new_fraction
        raise NumericalError(
            f"GPTQ could not factor the Hessian ({h.shape[0]} inputs): it is not positive definite even with "
            f"dampening {fraction:.3g} x mean(diag(H)); the calibration inputs are degenerate or non-finite "
            f"(mean diag {mean_diag:.3g}). Use more/different calibration data or a larger QuantScheme.dampening"
        )
