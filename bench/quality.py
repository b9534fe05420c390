"""Held-out perplexity and wall time of seqgen's quantization recipes on SmolLM2-135M, optionally beside AutoRound and
llm-compressor's GPTQ on the same token tensors.

Rows are ``ALGORITHM[-GRID][-OBSERVER][+tuneN]``: ``rtn-full``, ``rtn-minmax``, ``gptq-full``, ``gptq-minmax``,
``gptq-full-mse``, ``rtn-full+tune50`` (block tuning from RTN, 50 iterations), ``gptq-full+tune200``; ``fp`` is the
model unquantized. Each row runs once per group size (``--group-sizes 64,128``) in a process of its own, with the
calibration and held-out samples of ``bench/calibrate.py`` (the built-in corpora, the same tensors for every tool).
Wall time is calibration alone (package lookup included), model loading and evaluation excluded.

    python bench/quality.py [--bits 4] [--group-sizes 64,128] [--rows ...] [--num-samples 64] [--seq-len 512]
                            [--vs-autoround PYTHON] [--autoround-iters 50,200] [--vs-llmcompressor PYTHON]

``--vs-autoround`` and ``--vs-llmcompressor`` name the python of a venv with ``auto-round`` / ``llmcompressor``
installed (they pin other transformers versions); AutoRound gets the same samples, bits, group size, batch size and
iteration counts, and its own defaults otherwise (learning rate 1 / iterations, min-max scale tuning).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from calibrate import _LLMCOMPRESSOR_CHILD, _PERPLEXITY, _child, write_tokens  # bench/calibrate.py, beside this

_SEQGEN_CHILD = _PERPLEXITY + r"""
import json, sys, time
from safetensors.torch import load_file
from seqgen.algorithms import QuantScheme
from seqgen.algorithms.blocktune import TuneOptions
from seqgen.cache import PartitionCache
from seqgen.emitter import EmitOptions
from seqgen.models import load_model, meta_model
from seqgen.runtime import CalibrationOptions, calibrate
from seqgen.data import batches

row, data_file, batch_size, bits, group = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
recipe, _, tune = row.partition("+tune")
algorithm, *rest = recipe.split("-")
data = load_file(data_file)
model = load_model("smollm2-135m")
seconds = 0.0
if algorithm != "fp":
    start = time.perf_counter()
    package, _ = PartitionCache().get_or_emit(meta_model(model.config), EmitOptions())
    scheme = QuantScheme(bits=bits, group_size=group, act_order=algorithm == "gptq", grid=rest[0] if rest else "full",
                         observer=rest[1] if len(rest) > 1 else "minmax")
    options = CalibrationOptions(algorithm=algorithm, scheme=scheme, tune=TuneOptions(int(tune)) if tune else None)
    calibrate(model, package, batches(data["calibration"], batch_size), options)
    seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "ppl": heldout_perplexity(model, data["heldout"])}))
"""

_AUTOROUND_CHILD = _PERPLEXITY + r"""
import json, sys, time, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from auto_round import AutoRound

model_dir, data_file, bits, group, iters, batch_size = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
data = load_file(data_file)
ids = data["calibration"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
start = time.perf_counter()
rounder = AutoRound(model, AutoTokenizer.from_pretrained(model_dir), bits=bits, group_size=group, sym=True,
                    iters=iters, nsamples=ids.shape[0], seqlen=ids.shape[1], batch_size=batch_size,
                    dataset=[row[None] for row in ids], device_map="cpu")
rounder.quantize()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "ppl": heldout_perplexity(rounder.model.float(), data["heldout"])}))
"""

DEFAULT_ROWS = "fp,rtn-full,rtn-minmax,gptq-full,gptq-minmax,gptq-full-mse,rtn-full+tune50,rtn-full+tune200"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-sizes", default="64,128")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="seqgen rows: fp, ALGORITHM[-GRID][-OBSERVER][+tuneN]")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward, and per tuning step")
    parser.add_argument("--vs-autoround", metavar="PYTHON", help="python of a venv with auto-round installed")
    parser.add_argument("--autoround-iters", default="50,200")
    parser.add_argument("--vs-llmcompressor", metavar="PYTHON", help="python of a venv with llmcompressor installed")
    args = parser.parse_args()

    from seqgen.models import smollm2_dir

    groups = [int(g) for g in args.group_sizes.split(",")]
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_file = str(Path(tmp) / "tokens.safetensors")
        write_tokens(data_file, args.num_samples, args.seq_len, args.eval_samples)
        for group in groups:
            plan = {}
            for row in args.rows.split(","):
                if row == "fp" and group != groups[0]:
                    continue
                child = (row, data_file, str(args.batch_size), str(args.bits), str(group))
                plan[f"seqgen {row}"] = (sys.executable, _SEQGEN_CHILD, *child)
            if args.vs_autoround:
                for iters in args.autoround_iters.split(","):
                    child = (str(smollm2_dir()), data_file, str(args.bits), str(group), iters, str(args.batch_size))
                    plan[f"autoround {iters}"] = (args.vs_autoround, _AUTOROUND_CHILD, *child)
            if args.vs_llmcompressor and args.bits == 4 and group == 64:  # the recipe of bench/calibrate.py
                plan["llm-compressor gptq"] = (
                    args.vs_llmcompressor,
                    _LLMCOMPRESSOR_CHILD,
                    str(smollm2_dir()),
                    data_file,
                )
            for label, (python, code, *child_args) in plan.items():
                results[label, group] = _child(python, code, *child_args)
                print(f"{label} g{group}: {results[label, group]}", file=sys.stderr, flush=True)

    fp = next((r["ppl"] for (label, _), r in results.items() if label == "seqgen fp"), None)
    print(
        f"SmolLM2-135M W{args.bits} sym, {args.num_samples} x {args.seq_len} calibration tokens, "
        f"{args.eval_samples} x {args.seq_len} held-out, batch {args.batch_size}"
    )
    print(f"{'row':<28} {'group':>6} {'wall s':>8} {'ppl':>9} {'vs fp':>8}")
    for (label, group), r in results.items():
        increase = f"{(r['ppl'] / fp - 1) * 100:+.1f}%" if fp else "-"
        print(f"{label:<28} {group:>6} {r['seconds']:>8.1f} {r['ppl']:>9.3f} {increase:>8}")


if __name__ == "__main__":
    main()
