"""Fresh-process check: load saved models and their packages, run, compare logits with eager.

Usage: run_packages.py MODEL_DIR PACKAGE_DIR [MODEL_DIR PACKAGE_DIR ...]
Prints a JSON object: per package the max abs diff for each batch shape, and whether the tracer was imported.
"""

import json
import sys

import torch
from transformers import AutoConfig

import seqgen
from seqgen.models import auto_class
from seqgen.verify import random_batch

SHAPES = [(2, 64), (3, 9), (1, 1)]  # the emit sample, then other sizes and lengths


def main() -> None:
    results = {}
    pairs = sys.argv[1:]
    for model_dir, package_dir in zip(pairs[::2], pairs[1::2], strict=True):
        model = auto_class(AutoConfig.from_pretrained(model_dir)).from_pretrained(model_dir, dtype=torch.float32).eval()
        package = seqgen.load(package_dir)
        diffs = {}
        for batch_size, seq_len in SHAPES:
            batch = random_batch(model.config.get_text_config().vocab_size, batch_size, seq_len, seed=seq_len)
            with torch.no_grad():
                expected = model(**batch).logits
                actual = package.run(model, **batch)["logits"]
            diffs[f"{batch_size}x{seq_len}"] = (expected - actual).abs().max().item()
        results[package_dir] = diffs
    traced = sorted(name for name in sys.modules if name.startswith(("seqgen.trace", "seqgen.emitter")))
    print(json.dumps({"diffs": results, "tracer_modules": traced}))


main()
