"""Write a quantized model as a checkpoint that transformers and vLLM load, in one call (the whole model in memory).

``save_format="compressed"`` writes the compressed-tensors ``pack-quantized`` format (see ``compressed.py``);
``save_format="fake"`` writes the dequantized weights as an ordinary checkpoint (no ``quantization_config``), for
tools that know no quantized format. Either way the directory is written beside ``out_dir`` and renamed into place
(:func:`~seqgen.checkpoint.atomic_directory`), so a failed or killed save never leaves a half-written checkpoint
there. With the weights offloaded to disk, ``streaming.py`` writes the same checkpoint one subgraph at a time.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SeqgenError
from ..faults import fault_point
from ..outputs import check_output, write_manifest
from ..runtime.experts import expert_weight
from .atomic import atomic_directory
from .compressed import compressed_checkpoint, write_quantization_config
from .keys import resolve_experts, resolve_modules

if TYPE_CHECKING:
    from ..algorithms.base import QuantizedWeight

__all__ = [
    "SAVE_FORMATS",
    "SERVING_FILES",
    "apply_fake_quant",
    "check_save_format",
    "copy_serving_files",
    "counts_text",
    "save_quantized",
]

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("compressed", "fake")


def apply_fake_quant(
    model: torch.nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    *,
    experts: Mapping[str, QuantizedWeight] | None = None,
) -> None:
    """Overwrite each quantized Linear's weight, and each quantized expert's slice of its fused parameter (``experts``:
    ``"<module>.<param>.<expert>"`` -> QuantizedWeight, as in ``CalibrationResult.experts``), in place, with its
    dequantized value (one layer at a time)."""
    modules = resolve_modules(model, quantized)
    params = resolve_experts(model, experts or {})
    with torch.no_grad():
        for name, qweight in quantized.items():
            weight = modules[name].weight
            weight.copy_(qweight.dequantize(dtype=weight.dtype).to(weight.device))
        for key, qweight in (experts or {}).items():
            param, expert = params[key]
            target = expert_weight(model.get_submodule(key.rsplit(".", 2)[0]), key.rsplit(".", 2)[1], expert)
            target.copy_(qweight.dequantize(dtype=param.dtype).to(param.device))


def save_quantized(
    model: torch.nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    out_dir: str | Path,
    *,
    experts: Mapping[str, QuantizedWeight] | None = None,
    tokenizer: Any = None,
    source_dir: str | Path | None = None,
    save_format: str = "compressed",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Save ``model`` with the Linear weights of ``quantized`` (module name -> QuantizedWeight) quantized.

    ``experts`` (``"<module>.<param>.<expert>"`` -> QuantizedWeight, as in ``CalibrationResult.experts``) quantizes
    fused MoE experts too; every expert of both parameters of a fused experts module must be there (``layout.py``
    says where they go). ``"compressed"`` leaves ``model`` untouched and stores only the packed codes and scales of
    the quantized layers next to references to the other parameters: no second copy of the weights is made.
    ``"fake"`` first writes the dequantized weights into ``model`` in place (see :func:`apply_fake_quant`; a no-op
    when they are there already), then saves it as a plain checkpoint. ``tokenizer``, when given, is saved alongside,
    and so are the files of :data:`SERVING_FILES` that ``source_dir`` (the model's checkpoint) has. An existing
    ``out_dir`` is replaced when it is empty, or with ``overwrite`` when it holds a previous seqgen output and nothing
    else (see :mod:`seqgen.outputs`; ``source_dir`` is never replaced). Returns the directory.
    """
    experts = experts or {}
    check_save_format(save_format)
    if not quantized and not experts:
        raise SeqgenError("save_quantized got no quantized layers; quantize the model first (or save it as it is).")
    if getattr(model.config, "quantization_config", None) is not None:
        raise SeqgenError(
            f"{type(model).__name__} already has a quantization_config in its config; "
            "quantize a model loaded from unquantized (fp16/bf16/fp32) weights."
        )
    out = Path(out_dir)
    check_output(out, overwrite=overwrite, inputs=[source_dir] if source_dir is not None else [])
    resolve_modules(model, quantized)
    resolve_experts(model, experts)
    if save_format == "compressed":  # every layer is checked before anything is written
        config, state_dict = compressed_checkpoint(model, quantized, experts)
    with atomic_directory(out, replace=True) as tmp:
        if save_format == "compressed":
            model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
            del state_dict
            write_quantization_config(model, config, tmp)
        else:
            apply_fake_quant(model, quantized, experts=experts)
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        fault_point("save")
        if source_dir is not None:
            copy_serving_files(Path(source_dir), tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
    logger.info("saved %s (%s format) to %s", counts_text(len(quantized), len(experts)), save_format, out)
    return out


def check_save_format(save_format: str) -> None:
    """Refuse a ``save_format`` that is not one of :data:`SAVE_FORMATS`."""
    if save_format not in SAVE_FORMATS:
        raise SeqgenError(f"unknown save_format {save_format!r}; use one of {list(SAVE_FORMATS)}.")


def counts_text(layers: int, experts: int) -> str:
    """``"N quantized layers"``, plus the quantized expert projections when there are any (for log lines)."""
    return f"{layers} quantized layers" + (f" and {experts} quantized expert projections" if experts else "")


# What a server needs next to the weights, config and tokenizer to serve a vision-language model (vLLM reads the
# image processor's settings and the chat template from these); copied from the source checkpoint when it has them
SERVING_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


def copy_serving_files(source: Path, target: Path) -> None:
    """Copy the files of :data:`SERVING_FILES` that checkpoint ``source`` has into ``target``."""
    for name in SERVING_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
