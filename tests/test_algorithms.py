"""Quantization algorithms: RTN bounds, GPTQ against an independent OBS reference and against RTN, statistics."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from seqgen.algorithms import (
    ALGORITHMS,
    GPTQ,
    GRIDS,
    RTN,
    ActivationObserver,
    Algorithm,
    HessianStatistics,
    QuantizedWeight,
    QuantScheme,
    Statistics,
    get_algorithm,
    quantize_rtn,
    register_algorithm,
)
from seqgen.errors import SeqgenError

SEED = 1234


def correlated_inputs(n: int, dim: int, rank: int = 8, noise: float = 0.05, seed: int = SEED) -> torch.Tensor:
    """Tokens with a random low-rank-plus-noise covariance (like real activations: a few dominant directions)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=g) * torch.linspace(3.0, 0.5, rank).unsqueeze(1)
    return torch.randn(n, rank, generator=g) @ basis + noise * torch.randn(n, dim, generator=g)


def random_weight(out: int, dim: int, seed: int = SEED + 1) -> torch.Tensor:
    return torch.randn(out, dim, generator=torch.Generator().manual_seed(seed)) * 0.05


def output_error(x: torch.Tensor, w: torch.Tensor, q: QuantizedWeight) -> float:
    """Relative output reconstruction error ||X W^T - X Wq^T|| / ||X W^T||."""
    ref = x @ w.T
    return ((ref - x @ q.dequantize().T).norm() / ref.norm()).item()


def gptq_quantize(w: torch.Tensor, x: torch.Tensor, scheme: QuantScheme) -> tuple[QuantizedWeight, HessianStatistics]:
    algo = get_algorithm("gptq", scheme)
    stats = algo.new_statistics(w.shape[1], torch.device("cpu"))
    for chunk in x.split(500):
        stats.update(chunk)
    stats.reduce_()
    return algo.quantize(w, stats), stats


# ---------------------------------------------------------------------------------------------------------- scheme


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 1}, "QuantScheme.bits must be an integer in 2..8, got 1"),
        ({"bits": 9}, "QuantScheme.bits must be an integer in 2..8, got 9"),
        ({"bits": 4.0}, "QuantScheme.bits must be an integer in 2..8, got 4.0"),
        (
            {"group_size": 0},
            "QuantScheme.group_size=0 is not a group size: use a positive number of columns per scale, or None for "
            "one scale per output channel.",
        ),
        ({"group_size": -1}, "QuantScheme.group_size=-1 is not a group size"),
        ({"group_size": True}, "QuantScheme.group_size=True is not a group size"),
        ({"dampening": -0.1}, "QuantScheme.dampening must be a float >= 0, got -0.1"),
        ({"block_size": 0}, "QuantScheme.block_size must be a positive integer, got 0"),
    ],
)
def test_scheme_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        QuantScheme(**kwargs)


def test_bad_group_size_names_sizes() -> None:
    w = random_weight(8, 100)
    with pytest.raises(ValueError, match=r"group_size 64 .*in_features 100"):
        quantize_rtn(w, QuantScheme(group_size=64))
    stats = HessianStatistics(100, torch.device("cpu"))
    stats.update(torch.randn(16, 100))
    with pytest.raises(ValueError, match=r"group_size 64 .*in_features 100"):
        GPTQ(QuantScheme(group_size=64)).quantize(w, stats)


# ------------------------------------------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_full_grid_maps_each_groups_extreme_exactly(bits: int) -> None:
    """The full-range grid puts each group's larger-magnitude weight, of either sign, exactly on the lowest code
    (dequantized it equals the weight bit for bit), so every one of the 2^b levels is used; min-max never reaches
    the lowest code with the extreme and clips a positive extreme by half a step."""
    w = random_weight(64, 128)
    w[::2] = -w[::2]  # half the rows' extremes negative, half positive
    scheme = QuantScheme(bits=bits, group_size=32)
    q = quantize_rtn(w, scheme)
    grouped = w.reshape(64, 4, 32)
    where = grouped.abs().argmax(dim=-1, keepdim=True)
    extreme = grouped.gather(-1, where)
    codes = q.codes.reshape(64, 4, 32).gather(-1, where).int()
    dequantized = q.dequantize().reshape(64, 4, 32).gather(-1, where)
    assert (codes == scheme.qmin).all()
    assert torch.equal(dequantized, extreme)
    assert ((q.scale > 0) == (extreme.squeeze(-1) < 0)).all()  # the scale's sign is the opposite of the extreme's
    assert set(q.codes.unique().tolist()) == set(range(scheme.qmin, scheme.qmax + 1))
    minmax = quantize_rtn(w, QuantScheme(bits=bits, group_size=32, grid="minmax"))
    assert not torch.equal(minmax.dequantize().reshape(64, 4, 32).gather(-1, where), extreme)
    full_error = (q.dequantize() - w).pow(2).sum()
    assert full_error < (minmax.dequantize() - w).pow(2).sum()


@pytest.mark.parametrize("symmetric,grid", [(True, "full"), (True, "minmax"), (False, "full")])
def test_mse_observer_clips_outliers_for_a_finer_step(symmetric: bool, grid: str) -> None:
    """The MSE observer never quantizes a group worse than min-max (its first candidate is the min-max range), and
    on heavy-tailed weights it shrinks the range of the groups an outlier stretches, which lowers the error."""
    w = random_weight(64, 128)
    w[:, ::37] *= 6  # one outlier in most groups of 32
    base = dict(bits=4, group_size=32, symmetric=symmetric, grid=grid)
    minmax = quantize_rtn(w, QuantScheme(**base))
    mse = quantize_rtn(w, QuantScheme(**base, observer="mse"))

    def group_error(q: QuantizedWeight) -> torch.Tensor:
        return (q.dequantize() - w).abs().pow(2.4).reshape(64, 4, 32).sum(-1)

    assert (group_error(mse) <= group_error(minmax) * (1 + 1e-6)).all()
    assert (mse.scale.abs() < minmax.scale.abs()).float().mean() > 0.5  # most ranges shrunk
    assert (mse.dequantize() - w).pow(2).sum() < (minmax.dequantize() - w).pow(2).sum()
    assert mse.codes.min() >= QuantScheme(**base).qmin and mse.codes.max() <= QuantScheme(**base).qmax


@pytest.mark.parametrize("bits", [3, 4])
def test_full_grid_lowers_gptq_output_error(bits: int) -> None:
    """GPTQ on the full grid reconstructs a layer's output better than on the min-max grid (same data)."""
    w, x = random_weight(96, 256), correlated_inputs(2000, 256)
    errors = {
        grid: output_error(x, w, gptq_quantize(w, x, QuantScheme(bits=bits, group_size=64, grid=grid))[0])
        for grid in GRIDS
    }
    assert errors["full"] < errors["minmax"], errors


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric,grid", [(True, "full"), (True, "minmax"), (False, "full")])
@pytest.mark.parametrize("group_size", [None, 32])
def test_rtn_codes_in_range_and_error_bounded(bits: int, symmetric: bool, grid: str, group_size: int | None) -> None:
    w = random_weight(48, 128) + 0.02  # an offset makes asymmetric ranges differ from symmetric ones
    scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric, grid=grid)
    q = get_algorithm("rtn", scheme).quantize(w, None)
    n_groups = 1 if group_size is None else 128 // group_size
    assert q.codes.shape == (48, 128) and q.scale.shape == (48, n_groups) and q.scale.dtype == torch.float32
    assert q.g_idx is None
    codes = q.codes.int()
    if symmetric:
        assert q.codes.dtype == torch.int8 and q.zero_point is None
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    else:
        assert q.codes.dtype == torch.uint8 and q.zero_point.shape == (48, n_groups)
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
        assert q.zero_point.min() >= 0 and q.zero_point.max() <= 2**bits - 1
    # Every element is within half a step of its group's scale; on the full grid, values of the other sign than the
    # group's extreme that lie beyond the top code are clipped there, by less than one step.
    step = q.scale[:, q.group_index()].abs()
    error = (q.dequantize() - w).abs()
    clipped = codes == scheme.qmax if symmetric and grid == "full" else torch.zeros_like(codes, dtype=torch.bool)
    assert (error[~clipped] <= step[~clipped] / 2 * (1 + 1e-5) + 1e-7).all()
    assert (error[clipped] <= step[clipped] * (1 + 1e-5) + 1e-7).all()
    # Manual dequantization agrees with QuantizedWeight.dequantize.
    group = 128 if group_size is None else group_size
    manual = codes.float()
    if not symmetric:
        manual = manual - q.zero_point.float().repeat_interleave(group, dim=1)
    torch.testing.assert_close(manual * q.scale.repeat_interleave(group, dim=1), q.dequantize(), rtol=0, atol=0)


def test_rtn_does_not_modify_weight_and_keeps_zero_exact() -> None:
    w = random_weight(16, 64)
    w[:, :8] = 0.0
    before = w.clone()
    for symmetric in (True, False):
        q = quantize_rtn(w, QuantScheme(bits=4, group_size=32, symmetric=symmetric))
        assert torch.equal(w, before)
        assert (q.dequantize()[:, :8] == 0).all()


def test_rtn_asymmetric_beats_symmetric_on_shifted_weights() -> None:
    w = random_weight(32, 128).abs()  # one-signed: symmetric wastes half its codes
    sym = quantize_rtn(w, QuantScheme(bits=4, group_size=32, symmetric=True))
    asym = quantize_rtn(w, QuantScheme(bits=4, group_size=32, symmetric=False))
    assert (asym.dequantize() - w).norm() < 0.7 * (sym.dequantize() - w).norm()


def test_grouping_and_bits_reduce_error() -> None:
    w = random_weight(64, 256)
    err = {}
    for bits in (4, 8):
        for group in (None, 32):
            err[bits, group] = (quantize_rtn(w, QuantScheme(bits=bits, group_size=group)).dequantize() - w).norm()
    assert err[8, 32] < err[4, 32] / 10 and err[8, None] < err[4, None] / 10
    assert err[4, 32] < err[4, None]


def test_dequantize_dtype_and_to() -> None:
    q = quantize_rtn(random_weight(8, 64), QuantScheme(symmetric=False))
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
    moved = q.to("cpu")
    assert moved is not q and torch.equal(moved.codes, q.codes) and torch.equal(moved.zero_point, q.zero_point)


# ------------------------------------------------------------------------------------------------ Hessian statistics


@pytest.mark.parametrize("features", [64, 300])  # one block; four column blocks, the last one narrower
def test_accumulated_hessian_equals_batch_hessian(features: int) -> None:
    x = correlated_inputs(1000, features)
    stats = HessianStatistics(features, torch.device("cpu"))
    for size in (1, 7, 100, 392, 500):  # uneven batches, with leading dims
        chunk, x = x[:size], x[size:]
        stats.update(chunk.reshape(1, size, features).to(torch.bfloat16 if size == 7 else torch.float32))
    assert stats.nsamples == 1000
    x_all = correlated_inputs(1000, features)
    x_all[1:8] = x_all[1:8].to(torch.bfloat16).float()
    expected = 2.0 / 1000 * x_all.double().T @ x_all.double()
    hessian = stats.hessian
    torch.testing.assert_close(hessian.double(), expected, rtol=1e-5, atol=1e-5)
    assert hessian.dtype == torch.float32
    off_diagonal_blocks = ~torch.block_diag(*[torch.ones(e - s, e - s, dtype=torch.bool) for s, e in stats._bounds])
    assert torch.equal(hessian[off_diagonal_blocks], hessian.T[off_diagonal_blocks]), "mirrored, not recomputed"


def test_statistics_reject_wrong_width() -> None:
    with pytest.raises(ValueError, match="last dim 64"):
        HessianStatistics(64, torch.device("cpu")).update(torch.randn(3, 32))
    with pytest.raises(ValueError, match="last dim 64"):
        ActivationObserver(64, torch.device("cpu")).update(torch.randn(3, 32))


def test_update_does_not_modify_input() -> None:
    x = torch.randn(10, 16)
    before = x.clone()
    HessianStatistics(16, torch.device("cpu")).update(x)
    ActivationObserver(16, torch.device("cpu")).update(x)
    assert torch.equal(x, before)


# ---------------------------------------------------------------------------------------------------------- GPTQ


def reference_obs(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Independent float64 GPTQ without Cholesky or blocks: explicit inverse Hessian, one column eliminated at a time.

    After quantizing column j with error e = (w_j - q_j) / Hinv_jj, the other columns get -e * Hinv_j,: and the
    inverse of the Hessian restricted to the remaining columns is Hinv - Hinv_:j Hinv_j: / Hinv_jj. Returns the
    dequantized weight.
    """
    from seqgen.algorithms import compute_qparams, quantize_codes

    w = w.double().clone()
    h = h.double().clone()
    h += scheme.dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    group = scheme.group_size or w.shape[1]
    out = torch.empty_like(w)
    for j in range(w.shape[1]):
        if j % group == 0:
            scale, zero = compute_qparams(w[:, j : j + group], scheme)
        q = quantize_codes(w[:, j], scale, zero, scheme)
        out[:, j] = (q - zero) * scale if zero is not None else q * scale
        err = (w[:, j] - out[:, j]) / hinv[j, j]
        w[:, j + 1 :] -= torch.outer(err, hinv[j, j + 1 :])
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return out


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [128, 24, 7])  # 24, 7: groups of 16 straddle block boundaries
def test_gptq_matches_independent_reference(symmetric: bool, block_size: int) -> None:
    x = correlated_inputs(800, 64)
    w = random_weight(32, 64)
    scheme = QuantScheme(bits=4, group_size=16, symmetric=symmetric, block_size=block_size)
    q, stats = gptq_quantize(w, x, scheme)
    ref = reference_obs(w, stats.hessian, scheme)
    deq = q.dequantize().double()
    # fp32 vs fp64 may flip a rounding now and then; the rest is identical.
    close = (deq - ref).abs() <= 1e-4 * ref.abs().max()
    assert close.float().mean() > 0.99, close.float().mean()


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(symmetric: bool) -> None:
    x = correlated_inputs(2000, 128)
    w = random_weight(96, 128)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    q, _ = gptq_quantize(w, x, scheme)
    rtn = quantize_rtn(w, scheme)
    assert output_error(x, w, q) < 0.5 * output_error(x, w, rtn)
    assert torch.equal(w, random_weight(96, 128))  # not modified in place
    w_t = random_weight(96, 128).T.contiguous().T  # column-major storage: W^T is a free view of it
    gptq_quantize(w_t, x, scheme)
    assert torch.equal(w_t, w)


def test_gptq_per_channel_and_8bit() -> None:
    x = correlated_inputs(1000, 64)
    w = random_weight(32, 64)
    q4, _ = gptq_quantize(w, x, QuantScheme(bits=4, group_size=None))
    q8, _ = gptq_quantize(w, x, QuantScheme(bits=8, group_size=None))
    assert q4.scale.shape == (32, 1) and q4.g_idx is None
    ordered, _ = gptq_quantize(w, x, QuantScheme(bits=4, group_size=None, act_order=True))
    assert ordered.scale.shape == (32, 1) and torch.equal(ordered.g_idx, torch.zeros(64, dtype=torch.int32))
    assert output_error(x, w, q8) < output_error(x, w, q4) / 10
    assert output_error(x, w, q4) < 0.5 * output_error(x, w, quantize_rtn(w, QuantScheme(bits=4, group_size=None)))


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_act_order_g_idx(symmetric: bool) -> None:
    x = correlated_inputs(1500, 128)
    x = x * torch.linspace(0.2, 3.0, 128)[torch.randperm(128, generator=torch.Generator().manual_seed(SEED))]
    w = random_weight(48, 128)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric, act_order=True)
    q, stats = gptq_quantize(w, x, scheme)
    assert q.g_idx is not None and q.g_idx.dtype == torch.int32 and q.g_idx.shape == (128,)
    # Static groups: columns are visited by descending diag(H), but each group is 32 consecutive columns, the
    # layout compressed-tensors (actorder="weight") and vLLM store.
    assert torch.equal(q.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    # Dequantize with g_idx: every element within half a step of its own group's scale is not guaranteed (GPTQ
    # moves weights), but manual dequantization must agree and the error must beat RTN and plain GPTQ's ballpark.
    manual = q.codes.float()
    if not symmetric:
        manual = manual - q.zero_point.float()[:, q.g_idx.long()]
    torch.testing.assert_close(manual * q.scale[:, q.g_idx.long()], q.dequantize(), rtol=0, atol=0)
    plain, _ = gptq_quantize(w, x, QuantScheme(bits=4, group_size=32, symmetric=symmetric))
    assert output_error(x, w, q) < 0.5 * output_error(x, w, quantize_rtn(w, scheme))
    assert output_error(x, w, q) < 1.5 * output_error(x, w, plain)


def test_gptq_dead_inputs() -> None:
    x = correlated_inputs(500, 64)
    x[:, [3, 40]] = 0.0
    w = random_weight(16, 64)
    for act_order in (False, True):
        q, _ = gptq_quantize(w, x, QuantScheme(group_size=16, act_order=act_order, symmetric=False))
        deq = q.dequantize()
        assert torch.isfinite(deq).all() and (deq[:, [3, 40]] == 0).all()


def test_gptq_is_deterministic_and_state_dict_round_trips() -> None:
    x = correlated_inputs(1000, 128)
    w = random_weight(64, 128)
    scheme = QuantScheme(bits=4, group_size=32, act_order=True, symmetric=False)
    q1, stats = gptq_quantize(w, x, scheme)
    q2, _ = gptq_quantize(w, x, scheme)
    restored = GPTQ(scheme).new_statistics(128, torch.device("cpu"))
    state = {k: v.clone() for k, v in stats.state_dict().items()}
    restored.load_state_dict(state)
    assert restored.nsamples == stats.nsamples and torch.equal(restored.hessian, stats.hessian)
    q3 = GPTQ(scheme).quantize(w, restored)
    for other in (q2, q3):
        for field in ("codes", "scale", "zero_point", "g_idx"):
            assert torch.equal(getattr(q1, field), getattr(other, field)), field


def test_ordered_hessian_and_single_use_release() -> None:
    x = correlated_inputs(800, 320)  # four column blocks
    stats = HessianStatistics(320, torch.device("cpu"))
    stats.update(x)
    order = torch.randperm(320, generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(stats.ordered_hessian(order), stats.hessian[order][:, order])
    scheme = QuantScheme(bits=4, group_size=32, act_order=True)
    w = random_weight(40, 320)
    kept = GPTQ(scheme).quantize(w, stats)
    stats.single_use = True  # what the calibration loop sets: GPTQ frees X^T X once it has factored it
    released = GPTQ(scheme).quantize(w, stats)
    for field in ("codes", "scale", "g_idx"):
        assert torch.equal(getattr(kept, field), getattr(released, field)), field
    assert stats.xtx.numel() == 0 and not stats.factors
    for use in (lambda: stats.update(x), lambda: stats.hessian, lambda: GPTQ(scheme).quantize(w, stats)):
        with pytest.raises(SeqgenError, match="after release"):
            use()


def test_dequantize_with_reordered_groups() -> None:
    """A g_idx other than consecutive groups (as other GPTQ tools store act-order) dequantizes column by column."""
    q = quantize_rtn(random_weight(8, 64), QuantScheme(group_size=16, symmetric=False))
    g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(SEED)).to(torch.int32) // 16
    shuffled = QuantizedWeight(codes=q.codes, scale=q.scale, zero_point=q.zero_point, g_idx=g_idx, scheme=q.scheme)
    idx = g_idx.long()
    expected = (q.codes.float() - q.zero_point.float()[:, idx]) * q.scale[:, idx]
    assert torch.equal(shuffled.dequantize(), expected)
    assert torch.equal(
        q.dequantize(),
        (q.codes.float() - q.zero_point.float().repeat_interleave(16, 1)) * q.scale.repeat_interleave(16, 1),
    )
    assert q.codes.dtype == torch.uint8  # dequantize did not touch the codes


def test_gptq_accepts_low_precision_weight_and_inputs() -> None:
    x = correlated_inputs(600, 64).to(torch.bfloat16)
    w = random_weight(16, 64).to(torch.bfloat16)
    q, _ = gptq_quantize(w, x, QuantScheme(group_size=32))
    assert q.codes.shape == (16, 64) and torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ["gptq", "rtn"])
def test_scales_are_stored_in_the_weight_dtype(dtype: torch.dtype, algorithm: str) -> None:
    """Scales are rounded to the weight's dtype when computed, so the in-memory dequantized weight is exactly what a
    loader computes from the saved codes and scales (in that dtype, as compressed-tensors does)."""
    x = correlated_inputs(600, 64)
    w = random_weight(16, 64).to(dtype)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False, act_order=True)
    q = gptq_quantize(w, x, scheme)[0] if algorithm == "gptq" else quantize_rtn(w, scheme)
    assert torch.equal(q.scale.to(dtype).float(), q.scale)
    idx = q.group_index()
    loader = (q.codes.to(dtype) - q.zero_point.to(dtype)[:, idx]) * q.scale.to(dtype)[:, idx]
    assert torch.equal(q.dequantize(dtype), loader)


def test_gptq_cholesky_retries_then_raises(caplog: pytest.LogCaptureFixture) -> None:
    w = random_weight(4, 4)
    scheme = QuantScheme(group_size=None, dampening=0.01)
    stats = HessianStatistics(4, torch.device("cpu"))
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3, -1: fine after dampening 10 x mean diag
    # H = 2/N * X^T X, so X^T X = 5 H for N = 10
    stats.load_state_dict({"xtx": 5 * torch.block_diag(indefinite, indefinite), "nsamples": torch.tensor(10)})
    with caplog.at_level(logging.WARNING, logger="seqgen.algorithms.gptq"):
        q = GPTQ(scheme).quantize(w, stats)
    assert torch.isfinite(q.dequantize()).all() and "retrying" in caplog.text
    hopeless = torch.tensor([[1.0, 100.0], [100.0, 1.0]])
    stats.load_state_dict({"xtx": 5 * torch.block_diag(hopeless, hopeless), "nsamples": torch.tensor(10)})
    with pytest.raises(SeqgenError, match="not positive definite"):
        GPTQ(scheme).quantize(w, stats)


def test_gptq_needs_statistics() -> None:
    algo = GPTQ(QuantScheme())
    with pytest.raises(SeqgenError, match="HessianStatistics"):
        algo.quantize(random_weight(8, 64), None)
    with pytest.raises(SeqgenError, match="no tokens"):
        algo.quantize(random_weight(8, 64), algo.new_statistics(64, torch.device("cpu")))


# ------------------------------------------------------------------------------------------ Triton column kernel

# Schemes that take each path of the kernel: per-column parameters (activation order), one group's parameters per
# run of columns, a group that crosses a block boundary (96 in blocks of 64), per-channel, zero points, 3 and 8 bits.
KERNEL_SCHEMES = [
    QuantScheme(bits=4, group_size=64, act_order=True),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=4, group_size=96, block_size=64),
    QuantScheme(bits=8, group_size=None, symmetric=False, block_size=50),
    QuantScheme(bits=3, group_size=32, symmetric=False, act_order=True),
]
_KERNEL_CHECK = """
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
from test_algorithms import KERNEL_SCHEMES, correlated_inputs, gptq_quantize, output_error, random_weight
from seqgen.algorithms.gptq_kernel import kernel_enabled
rows = []
x, w = correlated_inputs(600, 192), random_weight(24, 192)
for scheme in KERNEL_SCHEMES:
    got = {{}}
    for choice in ("torch", "triton"):
        os.environ["SEQGEN_GPTQ_KERNEL"] = choice
        q, _ = gptq_quantize(w, x, scheme)
        got[choice] = q
    a, b = got["torch"], got["triton"]
    rows.append({{
        "enabled": kernel_enabled(torch.device("cpu")),
        "codes": (a.codes == b.codes).float().mean().item(),
        "scale": (a.scale - b.scale).abs().max().item() / a.scale.abs().max().item(),
        "zero": None if a.zero_point is None else torch.equal(a.zero_point, b.zero_point),
        "g_idx": (a.g_idx is None and b.g_idx is None) or torch.equal(a.g_idx, b.g_idx),
        "error": [output_error(x, w, a), output_error(x, w, b)],
    }})
print(json.dumps(rows))
"""


@pytest.mark.slow  # 50 s measured (8m50s CPU suite, 2 shared cores): Triton interprets the CUDA kernel on the CPU
def test_triton_column_kernel_matches_the_torch_loop() -> None:
    """The Triton kernel that runs GPTQ's column loop on CUDA, run here in Triton's interpreter on the CPU: the same
    codes and parameters as the torch loop (up to float rounding in the error feedback), on every path through it."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if importlib.util.find_spec("triton") is None:  # `make setup` keeps it beside the venv (see the Makefile)
        side = Path(sys.prefix) / "triton-interpreter"
        assert (side / "triton").is_dir(), f"no triton: `make setup` installs it into {side}"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(side), env.get("PYTHONPATH")]))
    script = _KERNEL_CHECK.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == len(KERNEL_SCHEMES)
    for scheme, row in zip(KERNEL_SCHEMES, rows, strict=True):
        assert row["enabled"], scheme
        assert row["codes"] >= 0.999, (scheme, row)
        assert row["scale"] < 1e-5, (scheme, row)
        assert row["zero"] in (None, True) and row["g_idx"], (scheme, row)
        torch_error, kernel_error = row["error"]
        assert abs(kernel_error - torch_error) <= 1e-3 * torch_error, (scheme, row)
    assert "could not run" not in done.stderr


def test_column_kernel_failure_falls_back_to_the_torch_loop(monkeypatch, caplog) -> None:
    """A Triton that cannot build the kernel (an old GPU, a broken toolchain) costs speed, not the job: the torch
    loop runs instead, with the same result, and one warning says why."""
    from seqgen.algorithms import gptq, gptq_kernel

    x, w = correlated_inputs(600, 192), random_weight(24, 192)
    scheme = QuantScheme(bits=4, group_size=64, act_order=True)
    expected, _ = gptq_quantize(w, x, scheme)

    def broken() -> None:
        raise RuntimeError("PTX .version 9.9 does not support .target sm_52")

    monkeypatch.setattr(gptq_kernel, "_failed", [])
    monkeypatch.setattr(gptq_kernel, "_kernel", broken)
    monkeypatch.setattr(gptq, "kernel_enabled", lambda device: True)
    with caplog.at_level(logging.WARNING, logger="seqgen.algorithms.gptq_kernel"):
        got, _ = gptq_quantize(w, x, scheme)
    assert torch.equal(got.codes, expected.codes) and torch.equal(got.scale, expected.scale)
    assert "sm_52" in caplog.text and "torch column loop" in caplog.text
    assert gptq_kernel._failed and not gptq_kernel.kernel_enabled(torch.device("cuda"))
    monkeypatch.setenv("SEQGEN_GPTQ_KERNEL", "off")
    with pytest.raises(SeqgenError, match="SEQGEN_GPTQ_KERNEL='off' is not a choice: use auto"):
        gptq_kernel.kernel_enabled(torch.device("cuda"))


# --------------------------------------------------------------------------------------------------- distributed


def _distributed_worker(rank: int, world: int, init: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x = correlated_inputs(1000, 32)
        mine = x[:300] if rank == 0 else x[300:]  # unequal shares: the average must weight by token count
        hessian, observer = HessianStatistics(32, torch.device("cpu")), ActivationObserver(32, torch.device("cpu"))
        for stats in (hessian, observer):
            stats.update(mine)
            stats.reduce_()
            stats.reduce_()  # a second call is a no-op
        torch.save({"hessian": hessian.state_dict(), "observer": observer.state_dict()}, f"{results}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_reduce_across_processes(tmp_path) -> None:
    import torch.multiprocessing as mp

    init, results = f"file://{tmp_path / 'store'}", str(tmp_path / "result")
    mp.start_processes(_distributed_worker, args=(2, init, results), nprocs=2, join=True, start_method="spawn")
    x = correlated_inputs(1000, 32)
    single = HessianStatistics(32, torch.device("cpu"))
    single.update(x)
    for rank in range(2):
        got = torch.load(f"{results}.{rank}")
        assert int(got["hessian"]["nsamples"]) == 1000 and int(got["observer"]["count"]) == 1000
        reduced = HessianStatistics(32, torch.device("cpu"))
        reduced.load_state_dict(got["hessian"])
        torch.testing.assert_close(reduced.hessian, single.hessian, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["observer"]["min"], x.amin(0), rtol=0, atol=0)
        torch.testing.assert_close(got["observer"]["absmax"], x.abs().amax(0), rtol=0, atol=0)
        torch.testing.assert_close(got["observer"]["mean_sq"], x.square().mean(0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ observer


def test_activation_observer() -> None:
    x = correlated_inputs(900, 32)
    obs = ActivationObserver(32, torch.device("cpu"))
    for chunk in x.split(250):
        obs.update(chunk.unsqueeze(0))
    obs.reduce_()
    s = obs.summary()
    torch.testing.assert_close(s["min"], x.amin(0), rtol=0, atol=0)
    torch.testing.assert_close(s["max"], x.amax(0), rtol=0, atol=0)
    torch.testing.assert_close(s["absmax"], x.abs().amax(0), rtol=0, atol=0)
    torch.testing.assert_close(s["mean_sq"], x.square().mean(0), rtol=1e-5, atol=1e-6)
    assert int(s["count"]) == 900
    restored = ActivationObserver(32, torch.device("cpu"))
    restored.load_state_dict({k: v.clone() for k, v in obs.state_dict().items()})
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in obs.state_dict().items())


# ------------------------------------------------------------------------------------------------------ registry


def test_registry() -> None:
    assert ALGORITHMS["rtn"] is RTN and ALGORITHMS["gptq"] is GPTQ
    assert RTN(QuantScheme()).new_statistics(64, torch.device("cpu")) is None
    assert isinstance(get_algorithm("gptq", QuantScheme()).new_statistics(64, torch.device("cpu")), Statistics)
    with pytest.raises(SeqgenError, match=r"'awq'.*gptq, rtn"):
        get_algorithm("awq", QuantScheme())


def test_register_custom_algorithm() -> None:
    @register_algorithm
    class HalfStep(Algorithm):
        name = "test-half-step"

        def quantize(self, weight: torch.Tensor, stats: Statistics | None) -> QuantizedWeight:
            return quantize_rtn(weight, self.scheme)

    try:
        assert isinstance(get_algorithm("test-half-step", QuantScheme()), HalfStep)
        with pytest.raises(ValueError, match="already taken"):

            @register_algorithm
            class Clash(Algorithm):
                name = "rtn"

                def quantize(self, weight: torch.Tensor, stats: Statistics | None) -> QuantizedWeight:
                    raise NotImplementedError

    finally:
        ALGORITHMS.pop("test-half-step", None)
    assert ALGORITHMS["rtn"] is RTN
