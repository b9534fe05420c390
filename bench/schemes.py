"""Quantization schemes side by side: seqgen against llm-compressor, recipe by recipe, wall time and held-out
perplexity.

SmolLM2-135M (the embedded default), 64 samples x 512 tokens of the built-in calibration corpus by default,
perplexity on the built-in held-out corpus with the activations quantized as the checkpoint's linears quantize them
(seqgen: ``quantize_inputs``; llm-compressor: its model after ``oneshot`` runs its quantized forward). Recipes:

    w4a16-gptq       W4A16 GPTQ (group 64: SmolLM2's width 576 is no multiple of the preset's 128)
    w4a16asym        W4A16_ASYM g64: seqgen RTN and GPTQ (llm-compressor 0.14's AWQ needs an accelerator)
    w8a8-sq-gptq     W8A8: SmoothQuant 0.8, then GPTQ
    fp8-dynamic      FP8_DYNAMIC (RTN: per-channel FP8 weights, per-token activations)
    fp8-static       FP8 (per-tensor weights, static per-tensor input scales from the calibration pass)
    nvfp4a16         NVFP4A16 (RTN)

    python bench/schemes.py [--recipes w4a16-gptq,fp8-dynamic] [--runs 1] [--num-samples 64] [--seq-len 512]
                            [--vs-llmcompressor /path/to/venv/bin/python]

Each row runs in its own process (bench/calibrate.py's children); wall time is seqgen's package lookup plus
calibration, or llm-compressor's ``oneshot``; loading the model and the data is excluded for both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate import _PERPLEXITY, _child  # noqa: E402 (the sibling script's children and perplexity)

# SmolLM2's width (576) is no multiple of 128: the W4 recipes use group 64 in both tools
_W4_G64 = "config_groups={'g': {'targets': ['Linear'], 'weights': {'num_bits': 4, 'type': 'int', 'symmetric': %s, "
_W4_G64 += "'strategy': 'group', 'group_size': 64}}}, ignore=['lm_head']"
_IGNORE = "targets='Linear', ignore=['lm_head']"
# recipe -> (preset, group size override, seqgen algorithms, smoothquant strength, llm-compressor modifiers or None)
RECIPES = {
    "w4a16-gptq": ("W4A16", "64", ["gptq"], None, f"GPTQModifier({_W4_G64 % True})"),
    "w4a16asym": ("W4A16_ASYM", "64", ["rtn", "gptq"], None, None),
    "w8a8-sq-gptq": (
        "W8A8",
        "-",
        ["gptq"],
        0.8,
        f"SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme='W8A8', {_IGNORE})",
    ),
    "fp8-dynamic": ("FP8_DYNAMIC", "-", ["rtn"], None, f"QuantizationModifier(scheme='FP8_DYNAMIC', {_IGNORE})"),
    "fp8-static": ("FP8", "-", ["rtn"], None, f"QuantizationModifier(scheme='FP8', {_IGNORE})"),
    "nvfp4a16": ("NVFP4A16", "-", ["rtn"], None, f"QuantizationModifier(scheme='NVFP4A16', {_IGNORE})"),
}

_SEQGEN_CHILD = _PERPLEXITY + r"""
import json, sys, time
from safetensors.torch import load_file
from seqgen.algorithms import scheme_from_preset
from seqgen.algorithms.activations import quantize_inputs
from seqgen.cache import PartitionCache
from seqgen.data import batches
from seqgen.emitter import EmitOptions
from seqgen.models import load_model, meta_model
from seqgen.runtime import CalibrationOptions, calibrate

preset, group, algorithm, strength, data_file, batch_size = sys.argv[1:7]
data = load_file(data_file)
model = load_model("smollm2-135m")
start = time.perf_counter()
package, _ = PartitionCache().get_or_emit(meta_model(model.config), EmitOptions())
overrides = {} if group == "-" else {"group_size": int(group)}
options = CalibrationOptions(
    algorithm=algorithm,
    scheme=scheme_from_preset(preset, act_order=algorithm == "gptq", **overrides),
    smoothquant=float(strength) if strength != "-" else None,
)
result = calibrate(model, package, batches(data["calibration"], int(batch_size)), options)
seconds = time.perf_counter() - start
with quantize_inputs(dict(model.named_modules()), result.quantized):
    ppl = heldout_perplexity(model, data["heldout"])
print(json.dumps({"seconds": seconds, "ppl": ppl}))
"""

_LLMCOMPRESSOR_CHILD = _PERPLEXITY + r"""
import json, sys, time, torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

model_dir, data_file, modifiers = sys.argv[1:4]
data = load_file(data_file)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ids = data["calibration"]
dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
start = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=list(eval(f"({modifiers},)")), max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0], processor=AutoTokenizer.from_pretrained(model_dir))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "ppl": heldout_perplexity(model, data["heldout"])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--runs", type=int, default=1, help="rounds (each row once per round); medians and spread")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="seqgen samples per forward")
    parser.add_argument("--vs-llmcompressor", metavar="PYTHON", help="python of a venv with llmcompressor installed")
    args = parser.parse_args()

    from safetensors.torch import save_file

    from seqgen.job import calibration_samples, heldout_samples, load_tokenizer
    from seqgen.models import smollm2_dir

    tokenizer = load_tokenizer("smollm2-135m")
    plan: dict[tuple[str, str], tuple[str, ...]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_file = str(Path(tmp) / "tokens.safetensors")
        calibration = calibration_samples(tokenizer, None, args.seq_len, args.num_samples)
        save_file(
            {"calibration": calibration, "heldout": heldout_samples(tokenizer, None, args.seq_len, args.eval_samples)},
            data_file,
        )
        for recipe in args.recipes.split(","):
            preset, group, algorithms, strength, modifiers = RECIPES[recipe]
            for algorithm in algorithms:
                child = (
                    preset,
                    group,
                    algorithm,
                    "-" if strength is None else str(strength),
                    data_file,
                    str(args.batch_size),
                )
                plan[(recipe, f"seqgen {algorithm}")] = (sys.executable, _SEQGEN_CHILD, *child)
            if args.vs_llmcompressor and modifiers:
                llmc = (args.vs_llmcompressor, _LLMCOMPRESSOR_CHILD, str(smollm2_dir()), data_file, modifiers)
                plan[(recipe, "llm-compressor")] = llmc
        rows: dict[tuple[str, str], list[dict[str, float]]] = {}
        for _ in range(args.runs):  # round by round: a slow spell of the machine hits every row of a round alike
            for key, (python, code, *child_args) in plan.items():
                rows.setdefault(key, []).append(_child(python, code, *child_args))
                print(f"{key[0]} {key[1]}: {rows[key][-1]}", file=sys.stderr, flush=True)

    print(
        f"SmolLM2-135M, {args.num_samples} x {args.seq_len} calibration tokens, {args.eval_samples} x {args.seq_len} "
        f"held-out; median of {args.runs} (ppl min-max over rounds)"
    )
    print(f"{'recipe':<14} {'tool':<16} {'wall s':>8} {'vs llmc':>8} {'ppl':>9} {'ppl range':>19}")
    for (recipe, tool), runs in rows.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        ppls = [r["ppl"] for r in runs]
        reference = rows.get((recipe, "llm-compressor"))
        ratio = f"{seconds / statistics.median(r['seconds'] for r in reference):.2f}x" if reference else "-"
        spread = f"{min(ppls):.3f}-{max(ppls):.3f}"
        print(f"{recipe:<14} {tool:<16} {seconds:>8.1f} {ratio:>8} {statistics.median(ppls):>9.3f} {spread:>19}")


if __name__ == "__main__":
    main()
