"""Where fused MoE experts go in a checkpoint: names and rows of one 2-D linear per expert.

transformers 5 keeps a layer's experts as 3-D parameters (``gate_up_proj``, ``down_proj``; see ``runtime/experts.py``),
while most checkpoints store one linear per expert and projection, under names of the model's original checkpoint
layout (Mixtral ``block_sparse_moe.experts.<e>.w1/w2/w3``, Qwen3-MoE ``mlp.experts.<e>.gate_proj/up_proj/down_proj``).
:func:`checkpoint_layout` finds those names through transformers' own save-time weight conversion: reading a
checkpoint assembles the fused parameters from them, and writing a compressed one stores each expert's quantized rows
under them (the layout llm-compressor writes for vLLM's per-expert loaders).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..runtime.experts import expert_params, find_fused_experts, is_transposed_experts
from .transformers_limits import asymmetric_experts_error

if TYPE_CHECKING:
    from ..algorithms.base import QuantizedWeight

__all__ = [
    "SEQUENTIAL_EXPERTS",
    "ExpertLinear",
    "checkpoint_layout",
    "dense_per_expert",
    "expert_linears",
    "per_expert_weights",
    "sequential_experts",
]

logger = logging.getLogger(__name__)


def _expert_probes(
    model: torch.nn.Module, owners: list[str]
) -> tuple[dict[str, torch.Tensor], list[tuple[str, int, int, int]], int]:
    """Every row of the experts parameters of ``owners`` tagged with its own index (two equal columns), the tag
    range of each parameter ``(parameter, first tag, end tag, rows per expert)``, and the number of tags."""
    probes: dict[str, torch.Tensor] = {}
    ranges: list[tuple[str, int, int, int]] = []
    start = 0
    for name in (f"{o}.{p}" for o in owners for p in expert_params(model.get_submodule(o))):
        experts, rows = model.get_parameter(name).shape[:2]
        probes[name] = torch.arange(start, start + experts * rows).reshape(experts, rows, 1).repeat(1, 1, 2)
        ranges.append((name, start, start + experts * rows, rows))
        start += experts * rows
    return probes, ranges, start


def checkpoint_layout(model: torch.nn.Module, owner: str) -> dict[str, tuple[str, int, torch.Tensor]] | None:
    """Where transformers' save-time weight conversion puts the experts of the fused module ``owner``: checkpoint
    weight name -> (fused parameter, expert, its rows there, in ``[out, in]`` orientation); None when it does not
    split them into one 2-D weight per expert (architectures whose checkpoints keep the experts fused, e.g.
    GraniteMoE). Llama 4's experts, stored fused, load per expert when quantized: that layout is fixed.

    Each row of each fused parameter is tagged with its index (two equal columns: some transformers versions squeeze
    a dimension of size 1 while splitting) and the tags go through ``revert_weight_conversion`` (what
    ``save_pretrained`` runs), so the names and splits are the model's own, e.g. Mixtral's
    ``block_sparse_moe.experts.<e>.w1.weight`` = rows ``[0, I)`` of expert ``e`` of ``gate_up_proj``.
    """
    from transformers.core_model_loading import revert_weight_conversion

    module = model.get_submodule(owner)
    if is_transposed_experts(module):  # what transformers' SequentialLlama4TextExperts loads: a Llama4TextMLP each
        experts, hidden, two_inter = module.gate_up_proj.shape
        gate, up = torch.arange(two_inter // 2), torch.arange(two_inter // 2, two_inter)
        return {
            key: value
            for e in range(experts)
            for key, value in (
                (f"{owner}.{e}.gate_proj.weight", (f"{owner}.gate_up_proj", e, gate)),
                (f"{owner}.{e}.up_proj.weight", (f"{owner}.gate_up_proj", e, up)),
                (f"{owner}.{e}.down_proj.weight", (f"{owner}.down_proj", e, torch.arange(hidden))),
            )
        }
    try:
        probes, ranges, start = _expert_probes(model, [owner])
        reverted = revert_weight_conversion(model, dict(probes))
    except ValueError:
        # a converter that gathers the experts of several modules of one MoE block into one list of checkpoint
        # experts (Ernie 4.5 VL's text and vision experts) needs them all: probed together, the owner's layout kept
        block = owner.rsplit(".", 2)[0]
        owners = [owner] + [o for o in find_fused_experts(model.get_submodule(block), block) if o != owner]
        probes, ranges, start = _expert_probes(model, owners)
        reverted = revert_weight_conversion(model, dict(probes))
    layout: dict[str, tuple[str, int, torch.Tensor]] = {}
    seen = torch.zeros(start, dtype=torch.long)
    for key, tags in sorted(reverted.items()):
        per_expert = tags.dim() == 2 and tags.shape[1] == 2 and key.endswith(".weight")
        if not per_expert or not torch.equal(tags[:, 0], tags[:, 1]):  # a split of whole rows, not transposed
            return None
        flat = tags[:, 0]
        param, first, end, rows = next(r for r in ranges if r[1] <= int(flat[0]) < r[2])
        expert = (flat - first) // rows
        if int(flat.min()) < first or int(flat.max()) >= end or not bool((expert == expert[0]).all()):
            return None
        layout[key] = (param, int(expert[0]), (flat - first) % rows)
        seen[flat] += 1
    # every row exactly once, and the names are final: save_pretrained's own revert must leave them as they are
    if not bool((seen == 1).all()) or sorted(revert_weight_conversion(model, dict(reverted))) != sorted(reverted):
        return None
    return {key: value for key, value in layout.items() if value[0].startswith(f"{owner}.")}


class ExpertLinear(NamedTuple):
    """One expert's projection as a checkpoint linear: its rows of the expert's quantized slice of ``param``."""

    param: str  # the fused parameter, e.g. "model.layers.0.mlp.experts.gate_up_proj"
    qweight: QuantizedWeight


def expert_linears(model: torch.nn.Module, experts: Mapping[str, QuantizedWeight]) -> dict[str, ExpertLinear]:
    """Checkpoint linear name (e.g. ``model.layers.0.block_sparse_moe.experts.3.w1``) -> its quantized rows.

    Experts without a per-expert checkpoint layout are left out (with a warning): they are saved dequantized, fused.
    """
    import transformers

    linears: dict[str, ExpertLinear] = {}
    for owner in sorted({key.rsplit(".", 2)[0] for key in experts}):
        layout = checkpoint_layout(model, owner)
        if layout is None:
            logger.warning(
                "%s: transformers %s saves these fused experts fused (not one linear per expert), and "
                "compressed-tensors has no packed format for fused experts: they are saved dequantized (full size).",
                owner,
                transformers.__version__,
            )
            continue
        for key, (param, expert, rows) in layout.items():
            qweight = experts[f"{param}.{expert}"]
            name = key.removesuffix(".weight")
            if not qweight.scheme.symmetric:
                raise asymmetric_experts_error(f"{param}.{expert}")
            zero_point = None if qweight.zero_point is None else qweight.zero_point[rows]
            linears[name] = ExpertLinear(
                param,
                dataclasses.replace(
                    qweight, codes=qweight.codes[rows], scale=qweight.scale[rows], zero_point=zero_point
                ),
            )
    return linears


def dense_per_expert(model: torch.nn.Module, packed_owners: set[str]) -> dict[str, tuple[str, int, torch.Tensor]]:
    """The per-expert checkpoint layout (see :func:`checkpoint_layout`) of the fused experts left unquantized in
    the MoE block of experts saved packed (``packed_owners``; e.g. Ernie 4.5 VL's vision experts, which a text
    calibration never runs), to be saved dense under those names, as save_pretrained would, and listed in
    ``ignore``: its converter, which gathers the block's experts modules into one list of checkpoint experts, would
    otherwise see only the unquantized ones. Unquantized experts of other blocks are left to save_pretrained."""
    blocks = {owner.rsplit(".", 2)[0] for owner in packed_owners}
    sequential = sequential_experts(model)
    layout: dict[str, tuple[str, int, torch.Tensor]] = {}
    for owner in find_fused_experts(model, ""):
        if owner not in packed_owners and owner not in sequential and owner.rsplit(".", 2)[0] in blocks:
            layout.update(checkpoint_layout(model, owner) or {})
    return layout


# Fused experts that transformers rebuilds as one nn.Linear per expert when it loads a compressed-tensors checkpoint
# (quantizers/base.py MODULES_TO_PATCH_FOR_QUANTIZATION): class -> their per-expert linears' names in that module.
SEQUENTIAL_EXPERTS = {"Llama4TextExperts": ("gate_proj", "up_proj", "down_proj")}


def sequential_experts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The fused experts modules of ``model`` that a compressed checkpoint must store one linear per expert."""
    return {name: module for name, module in model.named_modules() if type(module).__name__ in SEQUENTIAL_EXPERTS}


def per_expert_weights(name: str, gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """Llama 4's transposed fused experts (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``) as the ``[out, in]``
    weights of transformers' ``SequentialLlama4TextExperts`` (copies: save_pretrained takes no strided views)."""
    inter = gate_up.shape[-1] // 2
    weights = {}
    for e in range(gate_up.shape[0]):
        weights[f"{name}.{e}.gate_proj.weight"] = gate_up[e, :, :inter].T.contiguous()
        weights[f"{name}.{e}.up_proj.weight"] = gate_up[e, :, inter:].T.contiguous()
        weights[f"{name}.{e}.down_proj.weight"] = down[e].T.contiguous()
    return weights
