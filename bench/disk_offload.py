"""Peak RSS of calibrating a >= 1B-parameter Llama whose fp32 weights (>= 4 GB) stay on disk.

A random-init Llama (TinyLlama-1.1B shape: hidden 2048, intermediate 5632, 22 layers, SmolLM2's vocabulary of
49152) is saved once in fp32, with SmolLM2's tokenizer. Then ``seqgen calibrate --offload disk`` runs in its own
process and its peak RSS is read from the kernel (``ru_maxrss`` of the children). That figure is the calibration's
only when the checkpoint already exists (``--workdir`` of an earlier run): the first run's children include the
process that builds the model in RAM, and then no RSS is printed. Goal: <= 1.5 GB, about a third of the weights.

    python bench/disk_offload.py [--workdir DIR] [--num-samples 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_MAKE = r"""
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from seqgen.models import smollm2_dir
config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(config)
print(sum(p.numel() for p in model.parameters()))
model.save_pretrained(sys.argv[1], max_shard_size="1GB")
AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(sys.argv[1])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint here between runs")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--algorithm", default="gptq")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="seqgen-disk-"))
    checkpoint = work / "llama-1b-fp32"
    built = not (checkpoint / "config.json").exists()
    params = -1
    if built:
        made = subprocess.run(
            [sys.executable, "-c", _MAKE, str(checkpoint)], capture_output=True, text=True, check=True
        )
        params = int(made.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "seqgen",
            "calibrate",
            "--model",
            str(checkpoint),
            "--offload",
            "disk",
            "--algorithm",
            args.algorithm,
            "--bits",
            "4",
            "--group-size",
            "64",
            "--num-samples",
            str(args.num_samples),
            "--seq-len",
            str(args.seq_len),
            "--batch-size",
            "4",
            "--save",
            str(work / "llama-1b-w4"),
            "--overwrite",  # the output of an earlier run with --workdir
            "--reemit",
        ],
        check=True,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{'checkpoint':<28} {'params':>14} {'fp32 on disk':>13} {'peak RSS':>10} {'wall':>8}")
    shown = f"{params / 1e9:.2f} B" if params > 0 else "(reused)"
    rss = "(rerun)" if built else f"{peak / 1024:.2f} GiB"
    print(f"{checkpoint.name:<28} {shown:>14} {size / 2**30:>10.2f} GiB {rss:>10} {seconds:>7.0f}s")


if __name__ == "__main__":
    main()
