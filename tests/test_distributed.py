"""Data-parallel calibration on torch.distributed: two gloo ranks, each with its share of the batches, quantize
bitwise as one process does; a rank that fails is named, and the other stops instead of waiting."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import seqgen
from seqgen.algorithms import QuantScheme
from seqgen.emitter import emit_model
from seqgen.models import meta_model, tiny_model
from seqgen.runtime import CalibrationOptions, calibrate
from seqgen.runtime.distributed import assign_owners, share
from seqgen.verify import random_batch

SIZES = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}
SCHEMES = {"llama": QuantScheme(bits=4, group_size=32, act_order=True), "qwen3_moe": QuantScheme(group_size=None)}
BATCHES = 5  # split 2 / 3: the ranks' shares differ in size
FIELDS = ("codes", "scale", "zero_point", "g_idx")
TIMEOUT_S = 20  # the process group's: a rank waits this long for a peer that hangs


def model(model_type: str) -> torch.nn.Module:
    return tiny_model(model_type, **SIZES) if model_type == "llama" else tiny_model(model_type)


def batches() -> list[dict[str, torch.Tensor]]:
    return [random_batch(99, 3, 20, seed=i) for i in range(BATCHES)]


# Each rank runs these cases; (model type, exact_hessian, observe, all_experts).
CASES = {
    "llama exact": ("llama", True, True, False),
    "llama fp32": ("llama", False, False, False),
    "moe exact": ("qwen3_moe", True, False, False),
}


def _calibrate(model_type: str, package: str, exact: bool, observe: bool, all_experts: bool, mine: list) -> dict:
    options = CalibrationOptions(
        scheme=SCHEMES[model_type], exact_hessian=exact, observe=observe, all_experts=all_experts, device="cpu"
    )
    result = calibrate(model(model_type), seqgen.load(package), mine, options)
    weights = {**result.quantized, **result.experts}
    return {
        "quantized": {name: {f: getattr(q, f) for f in FIELDS} for name, q in weights.items()},
        "stats": result.activation_stats,
    }


def _rank(rank: int, world: int, store: str, packages: dict[str, str], out: str) -> None:
    """One rank: each case on its share of the batches, then a failure in subgraph 1 on rank 1."""
    from datetime import timedelta

    from seqgen.runtime import steps
    from seqgen.runtime.distributed import local_batches

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S)
    )
    mine = local_batches(batches())
    results = {
        case: _calibrate(model_type, packages[model_type], exact, observe, experts, mine)
        for case, (model_type, exact, observe, experts) in CASES.items()
    }
    real = steps.propagate

    def failing(run, state, sub) -> None:  # noqa: ANN001 (the step's own signature)
        if rank == 1 and sub.index == 1:
            raise RuntimeError("out of memory (injected)")
        real(run, state, sub)

    steps.propagate = failing
    started = time.perf_counter()
    try:
        _calibrate("llama", packages["llama"], True, False, False, mine)
        failure = "none"
    except seqgen.SeqgenError as exc:
        failure = str(exc)
    results["failure"] = (failure, time.perf_counter() - started)
    torch.save(results, f"{out}.{rank}")
    # no destroy_process_group: rank 1 leaves as a failed rank does, and rank 0's group is broken


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("packages")
    return {
        model_type: str(emit_model(meta_model(model(model_type).config), root / model_type).path)
        for model_type in ("llama", "qwen3_moe")
    }


@pytest.fixture(scope="module")
def ranks(packages: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ranks")
    store, out = f"file://{tmp / 'store'}", str(tmp / "result")
    mp.start_processes(_rank, args=(2, store, packages, out), nprocs=2, join=True, start_method="spawn")
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def single(packages: dict[str, str]) -> dict[str, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: a matmul's rounding may depend on how it is split over threads
    try:
        return {
            case: _calibrate(model_type, packages[model_type], exact, observe, experts, batches())
            for case, (model_type, exact, observe, experts) in CASES.items()
        }
    finally:
        torch.set_num_threads(threads)


def test_shares_are_disjoint_contiguous_and_cover_the_batches() -> None:
    for count in (2, 5, 16, 17):
        for world in (1, 2, 3):
            if count < world:
                continue
            shares = [share(count, rank, world) for rank in range(world)]
            assert [i for s in shares for i in s] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_owners_balance_the_work() -> None:
    costs = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0]
    owners = assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == rank) for rank in range(2)]
    assert sorted(loads) == [19.0, 20.0]  # largest first: 9+6+4 and 8+7+5
    assert assign_owners(costs, 2) == owners and assign_owners(costs, 1) == [0] * 6


@pytest.mark.parametrize("case", ["llama exact", "moe exact"])
def test_two_ranks_quantize_bitwise_as_one_process(case: str, ranks: list[dict], single: dict) -> None:
    """With Hessians summed in fp64 the split of the batches does not change a bit: every rank holds the quantized
    weights of every linear (and expert) that one process computes from all batches."""
    expected = single[case]["quantized"]
    for rank, got in enumerate(ranks):
        assert list(got[case]["quantized"]) == list(expected), rank
        for name, fields in expected.items():
            for field, value in fields.items():
                mine = got[case]["quantized"][name][field]
                assert (mine is None and value is None) or torch.equal(mine, value), (rank, name, field)


def test_observer_statistics_reduce_with_min_max_and_token_weighted_means(ranks: list[dict], single: dict) -> None:
    expected = single["llama exact"]["stats"]
    assert expected
    for got in ranks:
        assert list(got["llama exact"]["stats"]) == list(expected)
        for name, stats in expected.items():
            mine = got["llama exact"]["stats"][name]
            for key in ("min", "max", "absmax", "count"):
                assert torch.equal(mine[key], stats[key]), (name, key)
            torch.testing.assert_close(mine["mean_sq"], stats["mean_sq"], rtol=1e-6, atol=0)


def test_fp32_hessians_split_over_ranks_keep_almost_every_code(ranks: list[dict], single: dict) -> None:
    """Summed in fp32 a split changes the order of the additions, so Hessians differ in the last bits and a code
    at a rounding boundary can flip (and GPTQ's error feedback carries the flip along its row): at least 99.9% of
    the codes are equal, and the ranks agree with each other exactly."""
    expected = single["llama fp32"]["quantized"]
    equal = total = 0
    for name, fields in expected.items():
        for got in ranks:
            codes = got["llama fp32"]["quantized"][name]["codes"]
            equal += int((codes == fields["codes"]).sum())
            total += codes.numel()
        assert torch.equal(
            ranks[0]["llama fp32"]["quantized"][name]["codes"], ranks[1]["llama fp32"]["quantized"][name]["codes"]
        )
    assert equal / total >= 0.999


def test_a_failed_rank_is_named_with_its_subgraph_and_the_other_stops(ranks: list[dict]) -> None:
    failed, failed_after = ranks[1]["failure"]
    stopped, stopped_after = ranks[0]["failure"]
    assert failed.startswith("rank 1 of 2 stopped in subgraph ") and "injected" in failed
    assert stopped.startswith("rank 0 of 2 stopped in subgraph ")
    assert stopped_after < TIMEOUT_S + 10, "rank 0 stops within the process group's timeout"


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["memory", "disk"])
def test_calibrate_nproc_2_saves_the_one_process_checkpoint(
    offload: str, tmp_path: Path, smollm2_tokenizer: Path
) -> None:
    """``seqgen calibrate --nproc 2`` (torchrun, two gloo ranks) writes the checkpoint that one process with
    ``--exact-hessian`` writes, tensor for tensor, in memory and disk offload; its summary names the ranks."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    checkpoint = tmp_path / "tiny-llama"
    tiny_model("llama", vocab_size=49152, **SIZES).save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(smollm2_tokenizer).save_pretrained(checkpoint)
    args = ["--model", str(checkpoint), "--group-size", "32", "--num-samples", "6", "--seq-len", "24"]
    args += ["--batch-size", "2", "--offload", offload, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun gives each rank
    cli = [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "calibrate", *args]
    runs = {
        "two": subprocess.run(
            [*cli, "--nproc", "2", "--save", str(tmp_path / "two")], capture_output=True, text=True, env=env
        ),
        "one": subprocess.run(
            [*cli, "--exact-hessian", "--save", str(tmp_path / "one")], capture_output=True, text=True, env=env
        ),
    }
    for name, proc in runs.items():
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "on 2 ranks (2/4 samples)" in runs["two"].stdout  # 3 batches: rank 0 takes 1, rank 1 takes 2
    one = {k: v for f in sorted((tmp_path / "one").glob("*.safetensors")) for k, v in load_file(f).items()}
    two = {k: v for f in sorted((tmp_path / "two").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(two) == sorted(one) and any(name.endswith("weight_packed") for name in one)
    for name, tensor in one.items():
        assert torch.equal(two[name], tensor), name
