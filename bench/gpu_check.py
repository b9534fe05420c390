"""GPU check: GPTQ on SmolLM2 with cuda:0 as the execution device and the weights offloaded to (pinned) CPU memory.

Calibrates three times: with and without prefetching the next subgraph's weights on a side stream, and with disk
offload (each subgraph's weights read from the safetensors checkpoint straight to the device). Prints one table: wall
time, peak GPU memory against the full model and against one subgraph's weights plus one batch's activations,
held-out perplexity, and whether the runs quantized bitwise alike. Run it through ``bench/gpu_check.sh``.

    python bench/gpu_check.py [--num-samples 64] [--seq-len 512] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import math
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
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + nll.item(), count + ids[:, 1:].numel()
    model.to("cpu")
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda:0", help="'cpu' only to try the script itself on a small run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device; torch.cuda.is_available() is False")

    from seqgen.algorithms import QuantScheme
    from seqgen.cache import PartitionCache
    from seqgen.data import batches
    from seqgen.emitter import EmitOptions
    from seqgen.job import _disk_model, calibration_samples, heldout_samples, load_tokenizer
    from seqgen.models import load_model, meta_model, smollm2_dir
    from seqgen.runtime import CalibrationOptions, SafetensorsWeights, calibrate

    tokenizer = load_tokenizer("smollm2-135m")
    calibration = calibration_samples(tokenizer, None, args.seq_len, args.num_samples)
    heldout = heldout_samples(tokenizer, None, args.seq_len, args.eval_samples)
    scheme = QuantScheme(bits=4, group_size=64, symmetric=True, act_order=True)

    model = load_model("smollm2-135m")
    package, _ = PartitionCache().get_or_emit(meta_model(model.config), EmitOptions())
    full = weight_bytes(model)
    largest = max(sum(weight_bytes(model.get_submodule(m)) for m in sg.modules) for sg in package.subgraphs[:-1])  # the tail (logits) does not run
    hidden = model.config.hidden_size
    # one batch's residual stream plus the widest activation of a decoder layer (the MLP's), fp32
    activations = 4 * args.batch_size * args.seq_len * (2 * hidden + 2 * model.config.intermediate_size)
    fp_ppl = perplexity(model, heldout, device, args.batch_size)
    del model

    rows: dict[str, dict[str, float]] = {}
    results = {}
    for name in ("prefetch", "no prefetch", "disk"):
        weights = None
        if name == "disk":  # a skeleton on meta; every subgraph's weights come from the checkpoint's files
            model = _disk_model(smollm2_dir(), torch.float32)
            weights = SafetensorsWeights(smollm2_dir(), model)
        else:
            model = load_model("smollm2-135m")
        start = time.perf_counter()
        result = calibrate(model, package, batches(calibration, args.batch_size),
                           CalibrationOptions(scheme=scheme, device=str(device), prefetch=name != "no prefetch"),
                           weights=weights)
        seconds = time.perf_counter() - start
        results[name] = result
        rows[name] = {"seconds": seconds, "peak": result.peak_device_bytes or 0,
                      "ppl": float("nan") if weights is not None else perplexity(model, heldout, device, args.batch_size)}
        del model
    same = {
        name: all(
            torch.equal(q.codes, results["prefetch"].quantized[n].codes)
            and torch.equal(q.scale, results["prefetch"].quantized[n].scale)
            for n, q in results[name].quantized.items()
        )
        and results[name].quantized.keys() == results["prefetch"].quantized.keys()
        for name in ("no prefetch", "disk")
    }

    mib = 1024 * 1024
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (no GPU memory figures)"
    print(f"{where}; SmolLM2-135M fp32, GPTQ W4A16 g64, {args.num_samples} x "
          f"{args.seq_len} tokens, batch {args.batch_size}; weights offloaded to pinned CPU memory "
          "(disk: read from the checkpoint's safetensors files)")
    print(f"full model weights {full / mib:.0f} MiB; largest subgraph {largest / mib:.0f} MiB; "
          f"one batch's activations ~{activations / mib:.0f} MiB")
    print(f"{'run':<12} {'wall s':>8} {'peak GPU MiB':>13} {'vs model':>9} {'ppl':>8} {'fp ppl':>8}")
    for name, row in rows.items():
        print(f"{name:<12} {row['seconds']:>8.1f} {row['peak'] / mib:>13.0f} {row['peak'] / full:>8.2f}x "
              f"{row['ppl']:>8.3f} {fp_ppl:>8.3f}")
    print(f"prefetch speed-up {rows['no prefetch']['seconds'] / rows['prefetch']['seconds']:.2f}x; quantized weights "
          f"bitwise equal to the prefetch run's: no prefetch {same['no prefetch']}, disk {same['disk']}; the disk run "
          "keeps no weights in memory, so it has no perplexity (nan)")


if __name__ == "__main__":
    main()
