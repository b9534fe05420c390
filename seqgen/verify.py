"""Equivalence with the eager model: the oracle for every package."""

from __future__ import annotations

import os

import torch

from .package import Package, load

__all__ = ["random_batch", "compare_with_eager", "checkpoint_differences"]


def random_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with left padding on the first row, so masks are exercised."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if seq_len > 2:
        attention_mask[0, : seq_len // 4] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def compare_with_eager(
    package: Package | str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    batch_size: int = 2,
    seq_len: int = 32,
    seed: int = 0,
) -> float:
    """Max abs difference between the package's logits and ``model(**batch).logits``."""
    pkg = package if isinstance(package, Package) else load(package)
    batch = random_batch(model.config.get_text_config().vocab_size, batch_size, seq_len, seed)
    expected = model(**batch).logits
    actual = pkg.run(model, **batch)["logits"]
    return (expected - actual).abs().max().item()


def checkpoint_differences(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[str]:
    """How two saved checkpoint directories differ, tensor for tensor: names held by one only, then names whose
    tensors are not equal (dtype, shape or a value); empty when they are the same (e.g. a calibration from disk
    against the same one in memory)."""
    from pathlib import Path

    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                found.update({key: f.get_tensor(key) for key in f.keys()})
        return found

    first, second = tensors(Path(a)), tensors(Path(b))
    differences = [f"only in {a}: {key}" for key in sorted(set(first) - set(second))]
    differences += [f"only in {b}: {key}" for key in sorted(set(second) - set(first))]
    differences += [
        f"differs: {key}"
        for key in sorted(set(first) & set(second))
        if first[key].dtype != second[key].dtype or not torch.equal(first[key], second[key])
    ]
    return differences
