#!/usr/bin/env bash
# The GPU scale benchmark (bench/gpu_scale.py): GPTQ W4A16 g128 of a random-init Llama-3-8B-shaped model (bf16,
# built here: no network), weights offloaded to CPU, on one GPU; then, with 2 or more GPUs, the same under torchrun on
# all of them, with the scaling against the one-GPU run. Needs about 40 GB of RAM and a python with a CUDA build of
# torch plus seqgen's dependencies (see bench/gpu_check.sh).
#
#     PYTHON=/path/to/python bench/gpu_scale.sh [--samples 512] [--seq-len 2048] [--batch-size 8] [--layers 32]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
gpus=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    gpus=$(nvidia-smi --list-gpus | wc -l)
fi
"$PYTHON" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
one=$(mktemp --suffix=.json)
trap 'rm -f "$one"' EXIT
"$PYTHON" bench/gpu_scale.py --json "$one" "$@"
if [ "$gpus" -ge 2 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$gpus" bench/gpu_scale.py --baseline "$one" "$@"
fi
