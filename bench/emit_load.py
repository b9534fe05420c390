"""Emit time, load time and peak RSS for SmolLM2-135M and an 80-layer 70B-class Llama config, on the meta device.

Each measurement runs in its own process (so peak RSS is that step's alone); the table shows the median of --runs.
Load is timed after importing torch and transformers, which a calibration process has loaded anyway.
The reference: llm-compressor retraces on every run (0.21 s and 0.6 s / 455 MB on this 2-core machine); seqgen
emits once and then only loads. Goals: load <= 0.1 s for 80 layers (hash checks included), emit <= 5 s, RSS < 1 GB.

    python bench/emit_load.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {
    "smollm2-135m (30 layers)": "smollm2-135m",
    "llama-70b config (80 layers)": "llama70b",
}

_CHILD = r"""
import json, resource, sys, time
step, model_id, out = sys.argv[1:4]
if step == "emit":
    from seqgen.emitter import emit_model
    from seqgen.models import meta_model, tiny_config
    if model_id == "llama70b":
        config = tiny_config("llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                             num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                             max_position_embeddings=8192)
        model = meta_model(config)
    else:
        model = meta_model(model_id)
    start = time.perf_counter()
    emit_model(model, out, force=True)
    seconds = time.perf_counter() - start
else:
    import seqgen
    import transformers.masking_utils  # the model's process has transformers loaded already; time seqgen only
    start = time.perf_counter()
    package = seqgen.load(out)
    seconds = time.perf_counter() - start
    assert len(package.subgraphs) > 30
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rss_mb": rss}))
"""


def measure(step: str, model_id: str, out: Path) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, step, model_id, str(out)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model_id in MODELS.items():
            out = Path(tmp) / model_id
            emits = [measure("emit", model_id, out) for _ in range(args.runs)]
            loads = [measure("load", model_id, out) for _ in range(args.runs)]
            rows.append((label, emits, loads))
    print(
        f"{'model':<30} {'emit s':>8} {'emit RSS MB':>12} {'load s':>8} {'load RSS MB':>12}   (median of {args.runs})"
    )
    for label, emits, loads in rows:
        med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
        print(
            f"{label:<30} {med(emits, 'seconds'):>8.3f} {med(emits, 'rss_mb'):>12.0f} "
            f"{med(loads, 'seconds'):>8.4f} {med(loads, 'rss_mb'):>12.0f}"
        )


if __name__ == "__main__":
    main()
