"""The keys of the quantized weights a save is given, resolved to the model's Linears and fused experts parameters.

``quantized`` maps module names to QuantizedWeights; ``experts`` maps ``"<module>.<param>.<expert>"`` to the
QuantizedWeight of one expert's slice of a fused parameter, as in ``CalibrationResult.experts``. A key that names
nothing, a weight of another shape, or a fused module with only some experts quantized is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SeqgenError
from ..runtime.experts import expert_params, expert_weight, is_fused_experts, is_transposed_experts

if TYPE_CHECKING:
    from ..algorithms.base import QuantizedWeight

__all__ = ["resolve_experts", "resolve_modules"]


def resolve_modules(model: torch.nn.Module, quantized: Mapping[str, Any]) -> dict[str, torch.nn.Linear]:
    """Module name -> its Linear, for every key of ``quantized``; checks that each names a Linear of its shape."""
    modules = {}
    for name, qweight in quantized.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise SeqgenError(
                f"quantized layer {name!r} is not a module of {type(model).__name__}; "
                "the keys of `quantized` must be module names from model.named_modules()."
            ) from exc
        if not isinstance(module, torch.nn.Linear):
            raise SeqgenError(
                f"quantized layer {name!r} is a {type(module).__name__}, not a torch.nn.Linear; "
                "only Linear layers can be saved quantized, leave this one out of `quantized`."
            )
        if tuple(qweight.codes.shape) != tuple(module.weight.shape):
            raise SeqgenError(
                f"quantized layer {name!r} has codes of shape {tuple(qweight.codes.shape)} but its weight is "
                f"{tuple(module.weight.shape)} [out, in]; quantize this model's weights, not another model's."
            )
        modules[name] = module
    return modules


def resolve_experts(
    model: torch.nn.Module, experts: Mapping[str, QuantizedWeight]
) -> dict[str, tuple[torch.nn.Parameter, int]]:
    """``"<module>.<param>.<expert>"`` -> (fused parameter, expert); checks names, shapes and completeness."""
    resolved: dict[str, tuple[torch.nn.Parameter, int]] = {}
    for key, qweight in experts.items():
        parts = key.rsplit(".", 2)
        owner, param_name, index = parts if len(parts) == 3 else ("", "", "")
        try:
            module = model.get_submodule(owner) if owner else None
        except AttributeError:
            module = None
        if (
            module is None
            or not is_fused_experts(module)
            or param_name not in expert_params(module)
            or not index.isdigit()
        ):
            raise SeqgenError(
                f"quantized expert {key!r} does not name an expert of a fused experts module of "
                f"{type(model).__name__}; keys are '<module>.<gate_up_proj|up_proj|down_proj>.<expert>', as in "
                "CalibrationResult.experts."
            )
        param = getattr(module, param_name)
        expert = int(index)
        if expert >= param.shape[0] or qweight.codes.shape != expert_weight(module, param_name, 0).shape:
            layout = "[experts, in, out]" if is_transposed_experts(module) else "[experts, out, in]"
            raise SeqgenError(
                f"quantized expert {key!r} has codes of shape {tuple(qweight.codes.shape)}, but {owner}.{param_name} "
                f"is {tuple(param.shape)} {layout}; quantize this model's experts, not another model's."
            )
        resolved[key] = (param, expert)
    for owner in {key.rsplit(".", 2)[0] for key in experts}:
        module = model.get_submodule(owner)
        missing = [
            f"{owner}.{name}.{e}"
            for name in expert_params(module)
            for e in range(getattr(module, name).shape[0])
            if f"{owner}.{name}.{e}" not in experts
        ]
        if missing:
            raise SeqgenError(
                f"{owner}: {len(missing)} expert projections are not quantized (e.g. {missing[0]!r}); a checkpoint "
                "cannot hold some experts of a fused module quantized and others not. Pass all of "
                "CalibrationResult.experts."
            )
    return resolved
