"""GPU scale: GPTQ W4A16 group 128 (static activation order) of a random-init model of Llama-3-8B's shape in bf16,
built on the machine (no network), its weights offloaded to CPU memory, on 512 random-token samples of 2048 tokens.

Prints the wall time of the calibration, the time of each phase against its FLOP floor at the GPU's dense bf16
peak (the fraction shows the gap to the hardware), and the peak GPU memory. The floors: a forward pass is its
linears' ``2 x params x tokens`` plus causal attention's ``2 x seq^2 x hidden`` per sample and layer; the Hessians'
accumulation ``tokens x in^2`` per group of linears sharing an input (``X^T X`` is symmetric); GPTQ's ``in^3 / 3``
(one Cholesky factorization) plus ``rows x in^2`` (each column's error update of the columns after it). Onload and
offload move weights, not FLOPs: their rate is shown in GB/s.

Under torchrun (one rank per GPU) each rank calibrates its share of the samples; rank 0 prints the table of its own
phases and the scaling against a one-GPU run's JSON (``--baseline``). ``bench/gpu_scale.sh`` runs both.

    python bench/gpu_scale.py [--samples 512] [--seq-len 2048] [--batch-size 8] [--layers 32] [--json OUT]
    torchrun --nproc-per-node N bench/gpu_scale.py --baseline OUT
    python bench/gpu_scale.py --shape tiny --device cpu --samples 4 --seq-len 32     # the CPU check (tests)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 512,
    },
}

# Dense bf16 tensor-core peaks (TFLOP/s) by the device name's first matching key.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0}


def build_model(shape: str, layers: int | None) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` with bf16 weights drawn from N(0, 0.02) (norms 1) on the CPU: structure
    on meta first, then each parameter filled alone, so no default initialization runs over 8B parameters."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})})
    with init_empty_weights(include_buffers=False):  # buffers (the rotary frequencies) are real
        model = LlamaForCausalLM(config)  # parameters on meta, made bf16 below; the rotary frequencies stay fp32
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            data = torch.empty(param.shape, dtype=torch.bfloat16)
            if name == "weight" and param.dim() == 1:
                data.fill_(1.0)
            else:
                data.normal_(0.0, 0.02, generator=generator)
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    return model.eval()


def flop_floors(config: Any, tokens: int, seq_len: int) -> dict[str, float]:
    """The FLOP floor of each phase for ``tokens`` calibration tokens in samples of ``seq_len`` (module docstring)."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    params = hidden * (hidden + 2 * kv + hidden) + 3 * hidden * inter
    forward = layers * (2 * params * tokens + causal_attention_flops(hidden, tokens, seq_len))
    groups = [(hidden, hidden + 2 * kv), (hidden, hidden), (hidden, 2 * inter), (inter, hidden)]  # (in, rows)
    hessians = layers * sum(tokens * cols**2 for cols, _ in groups)
    gptq = layers * sum(cols**3 / 3 + rows * cols**2 for cols, rows in groups)
    return {"calibrate": forward + hessians, "compress": gptq, "propagate": forward}


def causal_attention_flops(hidden: int, tokens: int, seq_len: int) -> float:
    """``Q K^T`` and ``A V`` of one layer over the causal half: ``2 x seq^2 x hidden`` per sample."""
    return 2.0 * seq_len * hidden * tokens


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def calibrate_once(args: argparse.Namespace) -> dict[str, Any]:
    """Build, emit (rank 0; the others find the package in the cache), calibrate this rank's share; the row."""
    from seqgen.algorithms import QuantScheme
    from seqgen.cache import PartitionCache
    from seqgen.data import batches
    from seqgen.emitter import EmitOptions
    from seqgen.models import meta_model
    from seqgen.runtime import CalibrationOptions, calibrate
    from seqgen.runtime.distributed import join_process_group, local_batches, main_first

    ranks = join_process_group(args.device)
    tick = time.perf_counter()
    model = build_model(args.shape, args.layers)
    built = time.perf_counter() - tick
    with main_first():
        package, _ = PartitionCache().get_or_emit(meta_model(model.config), EmitOptions())
    ids = torch.randint(
        0, model.config.vocab_size, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1)
    )
    mine = local_batches(batches(ids, args.batch_size))
    scheme = QuantScheme(bits=4, group_size=128, symmetric=True, act_order=True)
    options = CalibrationOptions(scheme=scheme, device=ranks.device, exact_hessian=args.exact_hessian)
    result = calibrate(model, package, mine, options)
    device = (
        torch.device(ranks.device) if ranks.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    tokens = sum(batch["input_ids"].numel() for batch in mine)
    weight_gb = sum(p.numel() * p.element_size() for p in model.model.layers.parameters()) / 1e9
    return {
        "rank": ranks.rank,
        "ranks": ranks.world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "build_s": built,
        "wall_s": result.seconds,
        "phases": result.phase_seconds(),
        "floors": flop_floors(model.config, tokens, args.seq_len),
        "peak_tflops": peak_tflops(device, args.peak_tflops),
        "peak_gpu_gb": (result.peak_device_bytes or 0) / 1e9,
        "layer_weights_gb": weight_gb,
        "samples": sum(batch["input_ids"].shape[0] for batch in mine),
        "linears": result.linears,
    }


def report(row: dict[str, Any], walls: list[float], baseline: dict[str, Any] | None) -> None:
    """The table of rank 0's phases, then the scaling when there are several ranks or a baseline."""
    print(
        f"{row['device']}: {row['ranks']} rank(s), {row['samples']} samples on rank 0, {row['linears']} linears, "
        f"model built in {row['build_s']:.0f}s"
    )
    print(f"{'phase':<10} {'seconds':>9} {'floor TFLOP':>12} {'of peak':>8}")
    for phase, seconds in row["phases"].items():
        floor = row["floors"].get(phase)
        if floor is not None:
            fraction = "n/a" if not row["peak_tflops"] else f"{floor / (row['peak_tflops'] * 1e12) / seconds:.1%}"
            print(f"{phase:<10} {seconds:>9.1f} {floor / 1e12:>12.1f} {fraction:>8}")
        else:
            rate = row["layer_weights_gb"] / seconds if seconds > 0 else float("inf")
            print(f"{phase:<10} {seconds:>9.1f} {'(weights)':>12} {rate:>6.1f}GB/s")
    peak = (
        f" at {row['peak_tflops']:.0f} TFLOP/s bf16" if row["peak_tflops"] else " (no bf16 peak known: --peak-tflops)"
    )
    print(f"wall {max(walls):.1f}s{peak}; peak GPU memory {row['peak_gpu_gb']:.1f} GB")
    if len(walls) > 1:
        print("wall per rank: " + ", ".join(f"{w:.1f}s" for w in walls))
    if baseline is not None:
        speedup = baseline["wall_s"] / max(walls)
        print(
            f"scaling: 1 rank {baseline['wall_s']:.1f}s, {row['ranks']} ranks {max(walls):.1f}s: {speedup:.2f}x "
            f"({speedup / row['ranks']:.0%} efficiency)"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a shorter run)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda:<local rank>, else cpu")
    parser.add_argument("--exact-hessian", action="store_true", help="sum Hessians in fp64 (rank-count invariant)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak, when the GPU is not in the table")
    parser.add_argument("--json", type=Path, default=None, help="write rank 0's row here")
    parser.add_argument("--baseline", type=Path, default=None, help="a one-rank run's --json, for the scaling")
    args = parser.parse_args(argv)
    row = calibrate_once(args)
    walls = [row["wall_s"]]
    if row["ranks"] > 1:
        gathered: list[Any] = [None] * row["ranks"]
        torch.distributed.all_gather_object(gathered, row["wall_s"])
        walls = [float(w) for w in gathered]
    if row["rank"] == 0:
        baseline = json.loads(args.baseline.read_text()) if args.baseline else None
        report(row, walls, baseline)
        if args.json:
            args.json.write_text(json.dumps({**row, "walls": walls}))
    return {**row, "walls": walls}


if __name__ == "__main__":
    main()
