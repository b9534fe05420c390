"""What transformers 5.24's loader of compressed-tensors checkpoints cannot load, found before or after a save.

The checkpoints seqgen writes are complete; these are limits of transformers' loader (its
``CompressedTensorsDequantize`` weight converter), refused where a checkpoint would not load at all and warned about
where part of it would not.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import SeqgenError

__all__ = ["asymmetric_experts_error", "warn_dense_tensors_transformers_drops"]

logger = logging.getLogger(__name__)


def asymmetric_experts_error(name: str) -> SeqgenError:
    """The error for fused experts ``name`` quantized asymmetrically, which a compressed checkpoint cannot hold."""
    return SeqgenError(
        f"{name}: fused MoE experts quantized with an asymmetric scheme cannot be saved compressed: transformers 5.24 "
        "decompresses each expert in a module without weight_zero_point (integrations/compressed_tensors.py "
        "CompressedTensorsDequantize), so the checkpoint would not load. Quantize with a symmetric scheme, or use "
        "save_format='fake' (--save-format fake)."
    )


def warn_dense_tensors_transformers_drops(model: torch.nn.Module, directory: Path) -> None:
    """Warn about dense tensors of a compressed checkpoint that transformers' loader loses.

    transformers 5.24 puts its ``CompressedTensorsDequantize`` in front of each of the model's weight converters whose
    sources are ``.weight`` tensors (per-expert merges into fused experts, concatenations such as Kimi's q/k/v
    convolutions), and that op passes on packed weights only: a dense tensor such a converter collects is dropped,
    so ``from_pretrained`` fails or leaves the parameter randomly initialised. The checkpoint is complete; the loader
    is what fails. Found by running the saved names through the model's own conversion mapping.
    """
    from safetensors import safe_open

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [
            c
            for c in conversions
            if isinstance(c, WeightConverter)
            and all(source.endswith(".weight") for source in c._original_source_patterns)
        ]
        if not converters:
            return
        stored: set[str] = set()
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                stored.update(f.keys())
        # a weight with a weight_scale beside it is quantized, stored unpacked (float-/int-quantized): it loads
        keys = sorted(
            k for k in stored if k.endswith(".weight") and f"{k.removesuffix('weight')}weight_scale" not in stored
        )
        dropped = [key for key in keys if rename_source_key(key, renamings, converters)[1] is not None]
    except (ImportError, AttributeError, TypeError) as exc:  # another transformers: nothing known to check
        logger.debug("skipped the check of dense tensors in converted weights: %s", exc)
        return
    if dropped:
        logger.warning(
            "%d dense tensors of this compressed-tensors checkpoint (e.g. %s) go through one of %s's weight "
            "converters, which transformers 5.24 drops while loading a compressed checkpoint (its "
            "CompressedTensorsDequantize passes on packed weights only): from_pretrained fails or leaves them random. "
            "Quantize them (fused experts: pass CalibrationResult.experts), or use save_format='fake' to load with "
            "transformers.",
            len(dropped),
            dropped[0],
            type(model).__name__,
        )
