"""Write the reference manifests of llm-compressor's checkpoints, one per quantization scheme, to tests/data/schemes/.

Run by hand, in a venv of llm-compressor's own (it pins another transformers than seqgen's):

    python3 -m venv /work/venvs/llmc
    /work/venvs/llmc/bin/pip install torch==2.13.0
    /work/venvs/llmc/bin/pip install llmcompressor==0.14.0.1
    /work/venvs/llmc/bin/python tests/data/make_references.py [SCHEME ...]

Each scheme quantizes the same tiny random Llama (seed 0, sizes below) with llm-compressor's recipe for it, saves it
compressed to a temporary directory, and stores only its manifest: every tensor's name, dtype and shape, and the
``quantization_config`` of its config.json (``tests/test_scheme_layouts.py`` compares seqgen's checkpoints with these).
No checkpoint is kept. The tiny MoE (Qwen3-MoE) reference is written the same way for FP8_DYNAMIC and NVFP4A16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "schemes"
SEED = 0
SAMPLES, SEQ_LEN = 16, 32

# Sizes divisible by the largest group (128) where a group runs along them; vocab and heads stay small and odd-ish.
LLAMA = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=99,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
MOE = dict(LLAMA, intermediate_size=256, moe_intermediate_size=128, head_dim=32, num_experts=4, num_experts_per_tok=2)


def recipe(scheme: str) -> list:
    """llm-compressor's modifiers for ``scheme``: the recipe its examples use (the usual calibration algorithm)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    ignore = ["lm_head", "re:.*mlp.gate$"]
    if scheme in ("W4A16", "W8A16"):
        return [GPTQModifier(targets="Linear", scheme=scheme, ignore=ignore)]
    if scheme == "W8A8":
        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme=scheme, ignore=ignore),
        ]
    # W4A16_ASYM: RTN, as llm-compressor 0.14's AWQ needs an accelerator; the layout is the same
    return [QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)]


LLAMA_SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8", "FP8_DYNAMIC", "NVFP4", "NVFP4A16")
MOE_SCHEMES = ("FP8_DYNAMIC", "NVFP4A16")


def tiny(kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    config = LlamaConfig(**LLAMA) if kind == "llama" else Qwen3MoeConfig(**MOE)
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def tokenizer(vocab: int):
    """A word-level tokenizer of ``vocab`` tokens: llm-compressor wants a processor when given a dataset, and the
    dataset here is token ids already (no hub download)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")), unk_token="w0")


def calibration_data(vocab: int):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (SAMPLES, SEQ_LEN), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def manifest(directory: Path) -> dict:
    """Names, dtypes and shapes of every tensor of the checkpoint in ``directory``, and its quantization_config."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sliced = f.get_slice(key)
                tensors[key] = {"dtype": sliced.get_dtype(), "shape": list(sliced.get_shape())}
    config = json.loads((directory / "config.json").read_text())
    return {"tensors": dict(sorted(tensors.items())), "quantization_config": config["quantization_config"]}


def reference(kind: str, scheme: str) -> dict:
    from llmcompressor import oneshot

    model = tiny(kind)
    vocab = model.config.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "source", Path(tmp) / "out"
        model.save_pretrained(source)  # llm-compressor reads the model's config by its path
        quantized = oneshot(
            model=str(source),
            dataset=calibration_data(vocab),
            recipe=recipe(scheme),
            processor=tokenizer(vocab),
            max_seq_length=SEQ_LEN,
            num_calibration_samples=SAMPLES,
        )
        quantized.save_pretrained(out, save_compressed=True)
        found = manifest(out)
    import compressed_tensors
    import llmcompressor
    import transformers

    found["made_with"] = {
        "llmcompressor": llmcompressor.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__,
        "model": kind,
        "config": LLAMA if kind == "llama" else MOE,
    }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("schemes", nargs="*", help="schemes to write (default: all)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    jobs = [("llama", s) for s in LLAMA_SCHEMES] + [("moe", s) for s in MOE_SCHEMES]
    for kind, scheme in jobs:
        if args.schemes and scheme not in args.schemes:
            continue
        name = f"{kind}-{scheme}.json"
        try:
            found = reference(kind, scheme)
        except Exception as error:  # noqa: BLE001 (a scheme llm-compressor cannot do here is reported, not fatal)
            print(f"{name}: failed: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        (OUT / name).write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        print(f"wrote {OUT / name} ({len(found['tensors'])} tensors)")


if __name__ == "__main__":
    main()
