"""GPU check: GPTQ on SmolLM2 with cuda:0 as the execution device and the weights offloaded to (pinned) CPU memory.

Calibrates in four ways: with and without prefetching the next subgraph's weights on a side stream, with disk
offload (each subgraph's weights read from the safetensors checkpoint straight to the device), and with prefetch but
GPTQ's column loop in torch ops instead of its Triton kernel (``SEQGEN_GPTQ_KERNEL=torch``); after one unmeasured
warm-up calibration (CUDA's lazily loaded kernels, Triton's compilation), they alternate for ``--repeats`` rounds.
Prints one table: median wall time (and the range), where the time goes, peak GPU memory against the full model and
against one subgraph's weights plus one batch's activations (measured: a forward of the model without its head, peak
memory less the weights), held-out perplexity, and how many quantized codes equal the first prefetch run's (the
runs with the kernel must agree bitwise; the torch loop rounds the error feedback differently). Run it through
``bench/gpu_check.sh``.

    python bench/gpu_check.py [--num-samples 64] [--seq-len 512] [--batch-size 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@torch.no_grad()
def perplexity(model: torch.nn.Module, samples: torch.Tensor, device: torch.device, batch_size: int) -> float:
    model.to(device)
    total, count = 0.0, 0
    for i in range(0, samples.shape[0], batch_size):
        ids = samples[i : i + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + nll.item(), count + ids[:, 1:].numel()
    model.to("cpu")
    return math.exp(total / count)


@torch.no_grad()
def activation_bytes(model: torch.nn.Module, samples: torch.Tensor, device: torch.device) -> int:
    """Peak device memory of one batch's forward through the model without its head (``lm_head``'s logits are not
    calibrated), less the weights: what one batch's activations take at their widest."""
    if device.type != "cuda":
        return 0
    base = model.get_decoder().to(device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = samples.to(device)
    base(input_ids=ids, attention_mask=torch.ones_like(ids))
    peak = torch.cuda.max_memory_allocated(device) - before
    base.to("cpu")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds of the four runs (medians reported)")
    parser.add_argument("--device", default="cuda:0", help="'cpu' only to try the script itself on a small run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device; torch.cuda.is_available() is False")

    from seqgen.algorithms import QuantScheme
    from seqgen.cache import PartitionCache
    from seqgen.checkpoint import SafetensorsWeights
    from seqgen.data import batches
    from seqgen.emitter import EmitOptions
    from seqgen.job import _disk_model, calibration_samples, heldout_samples, load_tokenizer
    from seqgen.models import load_model, meta_model, smollm2_dir
    from seqgen.runtime import CalibrationOptions, CalibrationResult, calibrate

    tokenizer = load_tokenizer("smollm2-135m")
    calibration = calibration_samples(tokenizer, None, args.seq_len, args.num_samples)
    heldout = heldout_samples(tokenizer, None, args.seq_len, args.eval_samples)
    scheme = QuantScheme(bits=4, group_size=64, symmetric=True, act_order=True)

    model = load_model("smollm2-135m")
    attention = model.config._attn_implementation
    package, _ = PartitionCache().get_or_emit(meta_model(model.config), EmitOptions())
    full = weight_bytes(model)
    largest = max(
        sum(weight_bytes(model.get_submodule(m)) for m in sg.modules) for sg in package.subgraphs[:-1]
    )  # the tail (logits) does not run
    activations = activation_bytes(model, calibration[: args.batch_size], device)
    fp_ppl = perplexity(model, heldout, device, args.batch_size)
    del model

    def run(name: str, samples: torch.Tensor) -> tuple[float, CalibrationResult, torch.nn.Module | None]:
        weights = None
        if name == "disk":  # a skeleton on meta; every subgraph's weights come from the checkpoint's files
            model = _disk_model(smollm2_dir(), torch.float32)
            weights = SafetensorsWeights(smollm2_dir(), model)
        else:
            model = load_model("smollm2-135m")
        os.environ["SEQGEN_GPTQ_KERNEL"] = "torch" if name == "torch loop" else "auto"
        start = time.perf_counter()
        result = calibrate(
            model,
            package,
            batches(samples, args.batch_size),
            CalibrationOptions(scheme=scheme, device=str(device), prefetch=name != "no prefetch"),
            weights=weights,
        )
        return time.perf_counter() - start, result, None if weights is not None else model

    names = ("prefetch", "no prefetch", "disk", "torch loop")
    run("prefetch", calibration[: args.batch_size])  # warm-up: CUDA loads kernels (linalg, cuBLAS) on first use
    seconds: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[CalibrationResult]] = {name: [] for name in names}
    ppl: dict[str, float] = {}
    for round_ in range(args.repeats):
        for name in names if round_ % 2 == 0 else reversed(names):  # alternate, so no run always goes first
            wall, result, model = run(name, calibration)
            seconds[name].append(wall)
            results[name].append(result)
            if name not in ppl:
                ppl[name] = perplexity(model, heldout, device, args.batch_size) if model is not None else math.nan
            del model

    reference = results["prefetch"][0].quantized

    def agreement(result: CalibrationResult) -> tuple[float, bool]:
        """The fraction of codes equal to the reference run's, and whether codes and scales are bitwise equal."""
        assert result.quantized.keys() == reference.keys()
        equal = sum(int((q.codes == reference[n].codes).sum()) for n, q in result.quantized.items())
        total = sum(q.codes.numel() for q in result.quantized.values())
        bitwise = all(
            torch.equal(q.codes, reference[n].codes) and torch.equal(q.scale, reference[n].scale)
            for n, q in result.quantized.items()
        )
        return equal / total, bitwise

    same = {name: [agreement(result) for result in results[name]] for name in names}

    mib = 1024 * 1024
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (no GPU memory figures)"
    print(
        f"{where}; SmolLM2-135M fp32 ({attention} attention), GPTQ W4A16 g64, {args.num_samples} x "
        f"{args.seq_len} tokens, batch {args.batch_size}; weights offloaded to pinned CPU memory "
        "(disk: read from the checkpoint's safetensors files)"
    )
    goal = (largest + activations) / mib
    print(
        f"full model weights {full / mib:.0f} MiB; largest subgraph {largest / mib:.0f} MiB; one batch's "
        f"activations {activations / mib:.0f} MiB (measured); goal: peak near {goal:.0f} MiB"
    )
    print(f"median of {args.repeats} runs each, after one warm-up; runs alternate in order")
    print(
        f"{'run':<12} {'wall s':>7} {'range s':>11} {'peak GPU MiB':>13} {'vs model':>9} {'ppl':>8} {'fp ppl':>8}"
        f" {'codes same':>10}  phases (median run)"
    )
    for name in names:
        order = sorted(range(args.repeats), key=lambda i: seconds[name][i])
        median = order[len(order) // 2]
        peak = max(r.peak_device_bytes or 0 for r in results[name])
        print(
            f"{name:<12} {seconds[name][median]:>7.1f} {min(seconds[name]):>5.1f}-{max(seconds[name]):<5.1f} "
            f"{peak / mib:>13.0f} {peak / full:>8.2f}x {ppl[name]:>8.3f} {fp_ppl:>8.3f} "
            f"{min(fraction for fraction, _ in same[name]):>10.5f}  {results[name][median].phase_summary()}"
        )
    median = {name: statistics.median(seconds[name]) for name in names}
    bitwise = {name: all(exact for _, exact in same[name]) for name in names[:3]}
    print(
        f"prefetch speed-up {median['no prefetch'] / median['prefetch']:.2f}x, Triton column kernel speed-up "
        f"{median['torch loop'] / median['prefetch']:.2f}x (medians); quantized weights bitwise equal to the first "
        f"prefetch run's in every run: {', '.join(f'{name} {bitwise[name]}' for name in bitwise)}; the disk run "
        "keeps no weights in memory, so it has no perplexity (nan)"
    )


if __name__ == "__main__":
    main()
