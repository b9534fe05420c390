"""What checking a subgraph's outputs for NaN and inf costs (seqgen.runtime.faults), next to the layer that made them.

One SmolLM2-135M decoder layer (random weights, fp32, CPU) on one calibration batch, against the check calibration
runs on its output: the fp32 sum seqgen uses, and ``isfinite().all()`` for comparison. Medians of ``--runs``.

    python bench/finite_check.py [--runs 7] [--batch-size 8] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from seqgen.models import load_config
from seqgen.runtime.faults import all_finite


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config("smollm2-135m")
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).eval()
    hidden = torch.randn(args.batch_size, args.seq_len, config.hidden_size)
    positions = torch.arange(args.seq_len)[None].expand(args.batch_size, -1)
    rotary = LlamaRotaryEmbedding(config)(hidden, positions)
    with torch.no_grad():
        output = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions)
        forward = median_seconds(
            lambda: layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions), args.runs
        )
    outputs = {"hidden_states": output}
    checked = median_seconds(lambda: all_finite(outputs), args.runs * 3)
    elementwise = median_seconds(lambda: bool(torch.isfinite(output).all()), args.runs * 3)
    threads = torch.get_num_threads()
    print(f"SmolLM2-135M layer, batch {args.batch_size} x {args.seq_len} tokens, fp32, {threads} threads")
    print(f"| {'what':<28} | {'ms':>8} | {'vs forward':>10} |")
    print(f"| {'-' * 28} | {'-' * 8}:| {'-' * 10}:|")
    for name, seconds in [
        ("layer forward", forward),
        ("fp32 sum (seqgen's check)", checked),
        ("isfinite().all()", elementwise),
    ]:
        print(f"| {name:<28} | {seconds * 1e3:8.2f} | {seconds / forward * 100:9.2f}% |")


if __name__ == "__main__":
    main()
