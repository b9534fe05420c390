"""A model with quantized weights as a compressed-tensors checkpoint: its state dict, its ``quantization_config``,
and the checks, made before a calibration, that its quantized layers can be stored so.

``config.json`` gets a ``quantization_config`` written by compressed-tensors' ``ModelCompressor.update_config``: the
layout vLLM's compressed-tensors weight-only (WNA16) scheme reads, and that ``AutoModelForCausalLM.from_pretrained``
(with compressed-tensors installed) decompresses on the first forward pass. Asymmetric checkpoints need
``quantization_config=CompressedTensorsConfig(dequantize=True)`` there with compressed-tensors 0.20: its lazy path
prepares an unpacked ``weight_zero_point`` and rejects the packed one that its own decompressor (and vLLM) read.

Quantized fused MoE experts are stored one packed linear per expert and projection (see ``layout.py``), which
``from_pretrained`` merges back (dequantizing them while loading: transformers 5.24 keeps no packed fused experts).
With transformers 5.24 this works for symmetric schemes only (see ``transformers_limits.py``), and such a checkpoint
with the experts left unquantized does not load either (the same op drops expert weights that have no
``weight_packed``), hence a warning then. Architectures whose checkpoints keep the experts fused (e.g. GraniteMoE) get
their quantized experts saved dequantized, fused, as compressed-tensors has no packed format for 3-D parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SeqgenError
from ..runtime.experts import find_fused_experts, is_transposed_experts
from .formats import MIXED_FORMAT, scheme_fields, weight_tensors
from .keys import resolve_experts, resolve_modules
from .layout import (
    SEQUENTIAL_EXPERTS,
    ExpertLinear,
    checkpoint_layout,
    dense_per_expert,
    expert_linears,
    per_expert_weights,
    sequential_experts,
)
from .packing import check_groups, check_layout
from .transformers_limits import asymmetric_experts_error, warn_dense_tensors_transformers_drops

if TYPE_CHECKING:
    from ..algorithms.base import QuantizedWeight, QuantScheme

__all__ = [
    "check_compressed_experts",
    "check_compressed_linears",
    "compressed_checkpoint",
    "experts_saved_dense",
    "quantization_config",
    "write_quantization_config",
]


def quantization_config(
    model: torch.nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    *,
    experts: Mapping[str, QuantizedWeight] | None = None,
) -> Any:
    """The compressed-tensors ``QuantizationConfig`` (pack-quantized, status compressed) for ``quantized`` and the
    fused MoE ``experts`` (see :func:`save_quantized`).

    One config group per distinct scheme: with a single scheme its targets are ``["Linear"]``, with several each
    group lists its module names (the experts' per-expert checkpoint names), the experts' group first: transformers
    5.24 applies the first group that names modules to every expert (``get_experts_scheme``). Its
    ``dequantize=True`` path also decompresses every dense layer with that first group's scheme
    (``get_dense_scheme``), so checkpoints with several schemes load right only through the default (lazy) path.
    ``ignore`` names every Linear of ``model`` that is not quantized (e.g. ``lm_head``).
    """
    resolve_experts(model, experts or {})
    return _config(model, quantized, expert_linears(model, experts or {}))


def compressed_checkpoint(
    model: torch.nn.Module, quantized: Mapping[str, QuantizedWeight], experts: Mapping[str, QuantizedWeight]
) -> tuple[Any, dict[str, torch.Tensor]]:
    """The ``quantization_config`` and the state dict (references to the model's tensors, not copies, where they are
    not quantized) of ``model`` saved compressed; every quantized layer is checked before anything is written."""
    modules = resolve_modules(model, quantized)
    linears = expert_linears(model, experts)
    config = _config(model, quantized, linears)
    return config, _state_dict(model, quantized, modules, experts, linears)


def write_quantization_config(model: torch.nn.Module, config: Any, directory: Path) -> None:
    """Add ``config`` to the ``config.json`` of the checkpoint ``model`` was saved to in ``directory`` (with
    compressed-tensors' ``ModelCompressor``), and warn about the dense tensors transformers' loader would drop."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=config).update_config(str(directory))
    warn_dense_tensors_transformers_drops(model, directory)


def _config(
    model: torch.nn.Module, quantized: Mapping[str, QuantizedWeight], linears: Mapping[str, ExpertLinear]
) -> Any:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    modules = resolve_modules(model, quantized)
    by_args: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for name, linear in linears.items():
        check_layout(name, tuple(linear.qweight.codes.shape), linear.qweight)
        args = scheme_fields(name, linear.qweight)
        key = _fields_key(args)
        if by_args and key not in by_args:
            raise SeqgenError(
                f"{name}: its scheme differs from that of {next(iter(by_args.values()))[1][0]}; transformers applies "
                "one scheme to all fused MoE experts (integrations/compressed_tensors.py get_experts_scheme). "
                "Quantize every expert with the same scheme, or use save_format='fake'."
            )
        by_args.setdefault(key, (args, []))[1].append(name)
    for name, qweight in quantized.items():
        check_groups(name, modules[name], qweight)
        args = scheme_fields(name, qweight)
        by_args.setdefault(_fields_key(args), (args, []))[1].append(name)
    groups = {}
    for index, (args, names) in enumerate(by_args.values()):
        targets = ["Linear"] if len(by_args) == 1 else sorted(names)
        groups[f"group_{index}"] = QuantizationScheme(targets=targets, **args)
    formats = {args["format"] for args, _ in by_args.values()}
    quantized_weights = {id(module.weight) for module in modules.values()}  # a shared weight: quantized everywhere
    ignore = [
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, torch.nn.Linear) and name and id(module.weight) not in quantized_weights
    ]
    packed_experts = {linear.param.rpartition(".")[0] for linear in linears.values()}
    ignore += [
        f"{name}.{e}.{linear}"
        for name, module in sequential_experts(model).items()
        if name not in packed_experts
        for e in range(module.gate_up_proj.shape[0])
        for linear in SEQUENTIAL_EXPERTS[type(module).__name__]
    ]
    ignore += [key.removesuffix(".weight") for key in dense_per_expert(model, packed_experts)]
    return QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else MIXED_FORMAT,
        quantization_status="compressed",
        ignore=ignore,
    )


def _fields_key(fields: dict[str, Any]) -> str:
    """A key that is equal for equal QuantizationScheme fields (:func:`~.formats.scheme_fields`)."""
    return "|".join(value if isinstance(value, str) else value.model_dump_json() for _, value in sorted(fields.items()))


def check_compressed_experts(model: torch.nn.Module, scheme: QuantScheme) -> None:
    """Raise now, before a calibration, if the fused MoE experts of ``model`` quantized with ``scheme`` could not be
    saved compressed (an asymmetric scheme where the checkpoint has per-expert linears). ``model`` may be on meta."""
    for owner in find_fused_experts(model, ""):
        if not scheme.symmetric and checkpoint_layout(model, owner) is not None:
            raise asymmetric_experts_error(owner)


def experts_saved_dense(model: torch.nn.Module) -> list[str]:
    """The fused MoE experts modules of ``model`` that a compressed checkpoint can only hold dense: transformers
    saves them fused (GraniteMoE, Qwen3-VL-MoE, Mistral 4), and compressed-tensors has no packed format for fused
    experts. ``model`` may be on meta."""
    return [owner for owner in find_fused_experts(model, "") if checkpoint_layout(model, owner) is None]


def check_compressed_linears(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Raise now, before a calibration, if a linear of ``names`` could not be saved compressed because its weight
    shares storage with another tensor (a tied embedding, views of one fused tensor). Weights on meta pass."""
    state_dict = model.state_dict()
    storages = _storages(state_dict)
    for name in names:
        weight = model.get_submodule(name).weight
        _, others = _storage_sharers(model, state_dict, storages, name, weight)
        if others:
            raise _shared_storage_error(name, others)


def _state_dict(
    model: torch.nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    modules: Mapping[str, torch.nn.Linear],
    experts: Mapping[str, QuantizedWeight],
    linears: Mapping[str, ExpertLinear],
) -> dict[str, torch.Tensor]:
    """The model's state dict (references, not copies) with each quantized weight replaced by its packed form, and
    the quantized fused experts by their per-expert packed linears (under checkpoint names) or, without a per-expert
    layout, by their dequantized values."""
    state_dict = model.state_dict()
    packed = {linear.param for linear in linears.values()}
    for param in {key.rsplit(".", 1)[0] for key in experts}:
        if param in packed:
            del state_dict[param]
        else:
            fused = model.get_parameter(param)
            transposed = is_transposed_experts(model.get_submodule(param.rpartition(".")[0]))
            state_dict[param] = torch.stack(
                [
                    (
                        experts[f"{param}.{e}"].dequantize(fused.dtype).T
                        if transposed
                        else experts[f"{param}.{e}"].dequantize(fused.dtype)
                    )
                    for e in range(fused.shape[0])
                ]
            )
    for name, linear in linears.items():
        dtype = model.get_parameter(linear.param).dtype
        for key, tensor in weight_tensors(name, linear.qweight, dtype).items():
            state_dict[f"{name}.{key}"] = tensor
    for name in sequential_experts(model):  # left unquantized: per expert too, and listed in `ignore`
        if f"{name}.gate_up_proj" in state_dict:
            state_dict.update(
                per_expert_weights(name, state_dict.pop(f"{name}.gate_up_proj"), state_dict.pop(f"{name}.down_proj"))
            )
    for key, (param, expert, rows) in dense_per_expert(model, {p.rpartition(".")[0] for p in packed}).items():
        state_dict.pop(param, None)
        state_dict[key] = model.get_parameter(param)[expert][rows].contiguous()
    storages = _storages(state_dict)
    for name, qweight in quantized.items():
        weight = modules[name].weight
        aliases, others = _storage_sharers(model, state_dict, storages, name, weight)
        if others:
            raise _shared_storage_error(name, others)
        packed = weight_tensors(name, qweight, weight.dtype)
        for module_name in [name, *aliases]:
            state_dict.pop(f"{module_name}.weight")
            for key, tensor in packed.items():
                state_dict[f"{module_name}.{key}"] = tensor
    return state_dict


def _storages(state_dict: Mapping[str, torch.Tensor]) -> dict[tuple[torch.device, int], list[str]]:
    """The keys of ``state_dict`` by the storage their tensors live in (meta tensors left out)."""
    found: dict[tuple[torch.device, int], list[str]] = {}
    for key, value in state_dict.items():
        if value.device.type != "meta":
            found.setdefault((value.device, value.untyped_storage().data_ptr()), []).append(key)
    return found


def _storage_sharers(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    storages: Mapping[tuple[torch.device, int], list[str]],
    name: str,
    weight: torch.Tensor,
) -> tuple[list[str], list[str]]:
    """The other holders of linear ``name``'s weight storage in ``state_dict`` (``storages`` indexes it): linears
    that hold this very weight (a block that several layers share, as in Zamba), which get it packed too
    (save_pretrained then keeps the tie's source only, as for dense tied weights), and any other tensor (a tied
    embedding, views of one fused tensor)."""
    if weight.device.type == "meta":
        return [], []
    shared = [
        key
        for key in storages.get((weight.device, weight.untyped_storage().data_ptr()), [])
        if key != f"{name}.weight" and key in state_dict
    ]
    aliases = [
        key[: -len(".weight")]
        for key in shared
        if key.endswith(".weight")
        and isinstance(alias := model.get_submodule(key[: -len(".weight")]), torch.nn.Linear)
        and alias.weight is weight
    ]
    return aliases, [key for key in shared if key[: -len(".weight")] not in aliases]


def _shared_storage_error(name: str, others: list[str]) -> SeqgenError:
    return SeqgenError(
        f"{name}.weight shares its storage with {others} (tied weights, or views of one fused tensor); such a weight "
        "cannot be stored quantized in one place and dense in the other. Leave this layer unquantized (--ignore), or "
        "save with --save-format fake."
    )
