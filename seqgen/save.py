"""Write a quantized model as a checkpoint that transformers and vLLM load.

``save_format="compressed"`` writes the compressed-tensors ``pack-quantized`` format: every quantized Linear stores
``weight_packed`` (its integer codes packed densely into int32 by compressed-tensors' ``pack_to_int32``),
``weight_scale``, ``weight_shape`` and, when asymmetric, ``weight_zero_point`` (packed along the output dimension);
``config.json`` gets a ``quantization_config`` written by compressed-tensors' ``ModelCompressor.update_config``.
This is the layout vLLM's compressed-tensors weight-only (WNA16) scheme reads, and
``AutoModelForCausalLM.from_pretrained(out_dir)`` (with compressed-tensors installed) decompresses it on the first
forward pass. Asymmetric checkpoints need ``quantization_config=CompressedTensorsConfig(dequantize=True)`` there with
compressed-tensors 0.20: its lazy path prepares an unpacked ``weight_zero_point`` and rejects the packed one that its
own decompressor (and vLLM) read.

Activation order is stored as ``actorder: "weight"``: compressed-tensors 0.20 removed the ``"group"`` order and its
``weight_g_idx``, so a ``g_idx`` that puts columns in groups out of order (GPTQ's dynamic groups) is refused; static
groups (``g_idx[j] == j // group_size``) are stored like any other.

Fused MoE experts (transformers 5 keeps them as 3D ``gate_up_proj`` / ``down_proj`` parameters; see
``runtime/experts.py``) are written in the layout llm-compressor writes for vLLM's per-expert loaders: one
pack-quantized linear per expert and projection, under the names of the model's original checkpoint layout (Mixtral
``block_sparse_moe.experts.<e>.w1/w2/w3``, Qwen3-MoE ``mlp.experts.<e>.gate_proj/up_proj/down_proj``). Those names
come from transformers' own save-time weight conversion, so ``from_pretrained`` merges the experts back (it
dequantizes them while loading: transformers 5.24 keeps no packed fused experts). With transformers 5.24 this works
for symmetric schemes only: the module its ``CompressedTensorsDequantize`` builds per expert has no
``weight_zero_point``, so asymmetric experts are refused. Nor does it load such a checkpoint with the experts left
unquantized (the same op drops expert weights that have no ``weight_packed``), hence a warning then. Architectures
whose checkpoints keep the experts fused (e.g. GraniteMoE) get their quantized experts saved dequantized, fused, as
compressed-tensors has no packed format for 3D parameters.

``save_format="fake"`` writes the dequantized weights as an ordinary checkpoint (no ``quantization_config``), for
tools that know no quantized format.

Either way the directory is written to a temporary sibling and renamed into place, so a failed or killed save never
leaves a half-written checkpoint under ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .errors import SeqgenError
from .runtime.experts import (
    EXPERT_PARAMS,
    checkpoint_layout,
    expert_params,
    expert_weight,
    find_fused_experts,
    is_fused_experts,
    is_transposed_experts,
)

if TYPE_CHECKING:
    from .algorithms.base import QuantizedWeight, QuantScheme

__all__ = [
    "SAVE_FORMATS",
    "SERVING_FILES",
    "save_quantized",
    "apply_fake_quant",
    "quantization_config",
    "check_compressed_experts",
    "check_compressed_linears",
    "experts_saved_dense",
    "StreamingSaver",
]

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("compressed", "fake")
PACK_FORMAT = "pack-quantized"


def apply_fake_quant(
    model: torch.nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    *,
    experts: Mapping[str, QuantizedWeight] | None = None,
) -> None:
    """Overwrite each quantized Linear's weight, and each quantized expert's slice of its fused parameter (``experts``:
    ``"<module>.<param>.<expert>"`` -> QuantizedWeight, as in ``CalibrationResult.experts``), in place, with its
    dequantized value (one layer at a time)."""
    modules = _resolve_modules(model, quantized)
    params = _resolve_experts(model, experts or {})
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
) -> Path:
    """Save ``model`` with the Linear weights of ``quantized`` (module name -> QuantizedWeight) quantized.

    ``experts`` (``"<module>.<param>.<expert>"`` -> QuantizedWeight, as in ``CalibrationResult.experts``) quantizes
    fused MoE experts too; every expert of both parameters of a fused experts module must be there (see the module
    docstring for the layout). ``"compressed"`` leaves ``model`` untouched and stores only the packed codes and scales
    of the quantized layers next to references to the other parameters: no second copy of the weights is made.
    ``"fake"`` first writes the dequantized weights into ``model`` in place (see :func:`apply_fake_quant`; a no-op
    when they are there already), then saves it as a plain checkpoint. ``tokenizer``, when given, is saved alongside,
    and so are the files of :data:`SERVING_FILES` that ``source_dir`` (the model's checkpoint) has. An existing
    ``out_dir`` is replaced when it is empty or holds a model (a ``config.json``). Returns the directory.
    """
    experts = experts or {}
    if save_format not in SAVE_FORMATS:
        raise SeqgenError(f"unknown save_format {save_format!r}; use one of {list(SAVE_FORMATS)}.")
    if not quantized and not experts:
        raise SeqgenError("save_quantized got no quantized layers; quantize the model first (or save it as it is).")
    if getattr(model.config, "quantization_config", None) is not None:
        raise SeqgenError(
            f"{type(model).__name__} already has a quantization_config in its config; "
            "quantize a model loaded from unquantized (fp16/bf16/fp32) weights."
        )
    out = Path(out_dir)
    _check_target(out)
    modules = _resolve_modules(model, quantized)
    _resolve_experts(model, experts)
    if save_format == "compressed":
        # validate every layer before anything is written
        expert_linears = _expert_linears(model, experts)
        config = _quantization_config(model, quantized, expert_linears)
        state_dict = _compressed_state_dict(model, quantized, modules, experts, expert_linears)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if save_format == "compressed":
            from compressed_tensors.compressors import ModelCompressor

            model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
            del state_dict
            ModelCompressor(quantization_config=config).update_config(str(tmp))
            _warn_dense_tensors_transformers_drops(model, tmp)
        else:
            apply_fake_quant(model, quantized, experts=experts)
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if source_dir is not None:
            _copy_serving_files(Path(source_dir), tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s (%s format) to %s", _counts(len(quantized), len(experts)), save_format, out)
    return out


def _counts(layers: int, experts: int) -> str:
    """``"N quantized layers"``, plus the quantized expert projections when there are any (for log lines)."""
    return f"{layers} quantized layers" + (f" and {experts} quantized expert projections" if experts else "")


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
    _resolve_experts(model, experts or {})
    return _quantization_config(model, quantized, _expert_linears(model, experts or {}))


def _quantization_config(
    model: torch.nn.Module, quantized: Mapping[str, QuantizedWeight], expert_linears: Mapping[str, _ExpertLinear]
) -> Any:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    modules = _resolve_modules(model, quantized)
    by_args: dict[str, tuple[Any, list[str]]] = {}
    for name, linear in expert_linears.items():
        _check_layout(name, tuple(linear.qweight.codes.shape), linear.qweight)
        args = _quantization_args(name, linear.qweight)
        key = args.model_dump_json()
        if by_args and key not in by_args:
            raise SeqgenError(
                f"{name}: its scheme differs from that of {next(iter(by_args.values()))[1][0]}; transformers applies "
                "one scheme to all fused MoE experts (integrations/compressed_tensors.py get_experts_scheme). "
                "Quantize every expert with the same scheme, or use save_format='fake'."
            )
        by_args.setdefault(key, (args, []))[1].append(name)
    for name, qweight in quantized.items():
        _check_groups(name, modules[name], qweight)
        args = _quantization_args(name, qweight)
        key = args.model_dump_json()
        by_args.setdefault(key, (args, []))[1].append(name)
    groups = {}
    for index, (args, names) in enumerate(by_args.values()):
        targets = ["Linear"] if len(by_args) == 1 else sorted(names)
        groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=args, format=PACK_FORMAT)
    quantized_weights = {id(module.weight) for module in modules.values()}  # a shared weight: quantized everywhere
    ignore = [
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, torch.nn.Linear) and name and id(module.weight) not in quantized_weights
    ]
    packed_experts = {linear.param.rpartition(".")[0] for linear in expert_linears.values()}
    ignore += [
        f"{name}.{e}.{linear}"
        for name, module in _sequential_experts(model).items()
        if name not in packed_experts
        for e in range(module.gate_up_proj.shape[0])
        for linear in _SEQUENTIAL_EXPERTS[type(module).__name__]
    ]
    ignore += [key.removesuffix(".weight") for key in _dense_per_expert(model, packed_experts)]
    return QuantizationConfig(
        config_groups=groups,
        format=PACK_FORMAT,
        quantization_status="compressed",
        ignore=ignore,
    )


# What a server needs next to the weights, config and tokenizer to serve a vision-language model (vLLM reads the
# image processor's settings and the chat template from these); copied from the source checkpoint when it has them
SERVING_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


def _copy_serving_files(source: Path, target: Path) -> None:
    for name in SERVING_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def check_compressed_experts(model: torch.nn.Module, scheme: QuantScheme) -> None:
    """Raise now, before a calibration, if the fused MoE experts of ``model`` quantized with ``scheme`` could not be
    saved compressed (an asymmetric scheme where the checkpoint has per-expert linears). ``model`` may be on meta."""
    for owner in find_fused_experts(model, ""):
        if not scheme.symmetric and checkpoint_layout(model, owner) is not None:
            raise _asymmetric_experts_error(owner)


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


# ---- internals ------------------------------------------------------------------------------------------------------


def _resolve_modules(model: torch.nn.Module, quantized: Mapping[str, Any]) -> dict[str, torch.nn.Linear]:
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


class _ExpertLinear(NamedTuple):
    """One expert's projection as a checkpoint linear: its rows of the expert's quantized slice of ``param``."""

    param: str  # the fused parameter, e.g. "model.layers.0.mlp.experts.gate_up_proj"
    qweight: QuantizedWeight


def _resolve_experts(
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


def _expert_linears(model: torch.nn.Module, experts: Mapping[str, QuantizedWeight]) -> dict[str, _ExpertLinear]:
    """Checkpoint linear name (e.g. ``model.layers.0.block_sparse_moe.experts.3.w1``) -> its quantized rows.

    Experts without a per-expert checkpoint layout are left out (with a warning): they are saved dequantized, fused.
    """
    import transformers

    linears: dict[str, _ExpertLinear] = {}
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
                raise _asymmetric_experts_error(f"{param}.{expert}")
            zero_point = None if qweight.zero_point is None else qweight.zero_point[rows]
            linears[name] = _ExpertLinear(
                param,
                dataclasses.replace(
                    qweight, codes=qweight.codes[rows], scale=qweight.scale[rows], zero_point=zero_point
                ),
            )
    return linears


def _asymmetric_experts_error(name: str) -> SeqgenError:
    return SeqgenError(
        f"{name}: fused MoE experts quantized with an asymmetric scheme cannot be saved compressed: transformers 5.24 "
        "decompresses each expert in a module without weight_zero_point (integrations/compressed_tensors.py "
        "CompressedTensorsDequantize), so the checkpoint would not load. Quantize with a symmetric scheme, or use "
        "save_format='fake' (--save-format fake)."
    )


def _warn_dense_tensors_transformers_drops(model: torch.nn.Module, directory: Path) -> None:
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
        keys: list[str] = []
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                keys += [key for key in f.keys() if key.endswith(".weight")]
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


def _check_groups(name: str, module: torch.nn.Linear, qweight: QuantizedWeight) -> int:
    """The number of scale groups; raises when the layout is one compressed-tensors cannot store."""
    return _check_layout(name, tuple(module.weight.shape), qweight)


def _check_layout(name: str, shape: tuple[int, ...], qweight: QuantizedWeight) -> int:
    """:func:`_check_groups` for a weight of ``shape`` ``[out, in]``."""
    scheme = qweight.scheme
    out_features, in_features = shape
    if not 1 <= scheme.bits <= 8:
        raise SeqgenError(f"{name}: {scheme.bits}-bit weights cannot be packed; pack-quantized holds 1 to 8 bits.")
    group_size = scheme.group_size
    if group_size is None or group_size == -1:
        n_groups = 1
    else:
        if in_features % group_size:
            raise SeqgenError(
                f"{name}: in_features {in_features} is not a multiple of group_size {group_size}, which "
                "compressed-tensors requires; use a group size that divides it, per-channel (None), or "
                "save_format='fake'."
            )
        n_groups = in_features // group_size
        if qweight.g_idx is not None:
            natural = torch.arange(in_features, device=qweight.g_idx.device) // group_size
            if not torch.equal(qweight.g_idx.to(torch.int64), natural):
                raise SeqgenError(
                    f"{name}: its g_idx puts columns in groups out of order (activation ordering with dynamic "
                    "groups). compressed-tensors >= 0.20 stores only groups of consecutive columns "
                    "(actorder='weight'); quantize with static groups, or use save_format='fake'."
                )
    expected = (out_features, n_groups)
    if tuple(qweight.scale.shape) != expected:
        raise SeqgenError(f"{name}: scale has shape {tuple(qweight.scale.shape)}, expected {expected} [out, groups].")
    if not scheme.symmetric:
        zero_point = qweight.zero_point
        if zero_point is None or tuple(zero_point.shape) != expected:
            shape = None if zero_point is None else tuple(zero_point.shape)
            raise SeqgenError(f"{name}: asymmetric scheme needs a zero_point of shape {expected}, got {shape}.")
    return n_groups


def _quantization_args(name: str, qweight: QuantizedWeight) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    scheme = qweight.scheme
    grouped = scheme.group_size is not None and scheme.group_size != -1
    fields: dict[str, Any] = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": bool(scheme.symmetric),
        "strategy": "group" if grouped else "channel",
        "group_size": scheme.group_size if grouped else None,
        "dynamic": False,
    }
    if scheme.act_order:
        # the order only changed how GPTQ visited the columns: the groups stay consecutive, as stored
        fields["actorder"] = "weight"
    return QuantizationArgs(**fields)


def _signed_codes(name: str, values: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Codes (or zero points) as the signed int8 that ``pack_to_int32`` takes: [-2^(b-1), 2^(b-1)-1]."""
    if not symmetric and values.dtype == torch.int8:
        values = values.view(torch.uint8)  # 8-bit unsigned codes may be stored in int8 storage
    values = values.to(torch.int16)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    if values.numel() and (int(values.min()) < low or int(values.max()) > high):
        kind = "symmetric (signed)" if symmetric else "asymmetric (unsigned)"
        raise SeqgenError(
            f"{name}: values in [{int(values.min())}, {int(values.max())}] fall outside the {kind} {bits}-bit range "
            f"[{low}, {high}]; the QuantizedWeight does not match its scheme."
        )
    if not symmetric:
        values = values - (1 << (bits - 1))
    return values.to(torch.int8)


def _compress(name: str, qweight: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    scheme = qweight.scheme
    bits = scheme.bits
    tensors = {
        "weight_packed": pack_to_int32(_signed_codes(name, qweight.codes, bits, scheme.symmetric), bits),
        "weight_scale": qweight.scale.to(dtype).contiguous(),
        "weight_shape": torch.tensor(tuple(qweight.codes.shape), dtype=torch.int64),
    }
    if not scheme.symmetric:
        zero_point = _signed_codes(f"{name} zero_point", qweight.zero_point, bits, symmetric=False)
        tensors["weight_zero_point"] = pack_to_int32(zero_point, bits, packed_dim=0)
    return tensors


# Fused experts that transformers rebuilds as one nn.Linear per expert when it loads a compressed-tensors checkpoint
# (quantizers/base.py MODULES_TO_PATCH_FOR_QUANTIZATION): class -> their per-expert linears' names in that module.
_SEQUENTIAL_EXPERTS = {"Llama4TextExperts": ("gate_proj", "up_proj", "down_proj")}


def _sequential_experts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The fused experts modules of ``model`` that a compressed checkpoint must store one linear per expert."""
    return {name: module for name, module in model.named_modules() if type(module).__name__ in _SEQUENTIAL_EXPERTS}


def _per_expert_weights(name: str, gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """Llama 4's transposed fused experts (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``) as the ``[out, in]``
    weights of transformers' ``SequentialLlama4TextExperts`` (copies: save_pretrained takes no strided views)."""
    inter = gate_up.shape[-1] // 2
    weights = {}
    for e in range(gate_up.shape[0]):
        weights[f"{name}.{e}.gate_proj.weight"] = gate_up[e, :, :inter].T.contiguous()
        weights[f"{name}.{e}.up_proj.weight"] = gate_up[e, :, inter:].T.contiguous()
        weights[f"{name}.{e}.down_proj.weight"] = down[e].T.contiguous()
    return weights


def _compressed_state_dict(
    model: torch.nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    modules: Mapping[str, torch.nn.Linear],
    experts: Mapping[str, QuantizedWeight],
    expert_linears: Mapping[str, _ExpertLinear],
) -> dict[str, torch.Tensor]:
    """The model's state dict (references, not copies) with each quantized weight replaced by its packed form, and
    the quantized fused experts by their per-expert packed linears (under checkpoint names) or, without a per-expert
    layout, by their dequantized values."""
    state_dict = model.state_dict()
    packed = {linear.param for linear in expert_linears.values()}
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
    for name, linear in expert_linears.items():
        dtype = model.get_parameter(linear.param).dtype
        for key, tensor in _compress(name, linear.qweight, dtype).items():
            state_dict[f"{name}.{key}"] = tensor
    for name in _sequential_experts(model):  # left unquantized: per expert too, and listed in `ignore`
        if f"{name}.gate_up_proj" in state_dict:
            state_dict.update(
                _per_expert_weights(name, state_dict.pop(f"{name}.gate_up_proj"), state_dict.pop(f"{name}.down_proj"))
            )
    for key, (param, expert, rows) in _dense_per_expert(model, {p.rpartition(".")[0] for p in packed}).items():
        state_dict.pop(param, None)
        state_dict[key] = model.get_parameter(param)[expert][rows].contiguous()
    storages = _storages(state_dict)
    for name, qweight in quantized.items():
        weight = modules[name].weight
        aliases, others = _storage_sharers(model, state_dict, storages, name, weight)
        if others:
            raise _shared_storage_error(name, others)
        packed = _compress(name, qweight, weight.dtype)
        for module_name in [name, *aliases]:
            state_dict.pop(f"{module_name}.weight")
            for key, tensor in packed.items():
                state_dict[f"{module_name}.{key}"] = tensor
    return state_dict


def _dense_per_expert(model: torch.nn.Module, packed_owners: set[str]) -> dict[str, tuple[str, int, torch.Tensor]]:
    """The per-expert checkpoint layout (see :func:`checkpoint_layout`) of the fused experts left unquantized in
    the MoE block of experts saved packed (``packed_owners``; e.g. Ernie 4.5 VL's vision experts, which a text
    calibration never runs), to be saved dense under those names, as save_pretrained would, and listed in
    ``ignore``: its converter, which gathers the block's experts modules into one list of checkpoint experts, would
    otherwise see only the unquantized ones. Unquantized experts of other blocks are left to save_pretrained."""
    blocks = {owner.rsplit(".", 2)[0] for owner in packed_owners}
    sequential = _sequential_experts(model)
    layout: dict[str, tuple[str, int, torch.Tensor]] = {}
    for owner in find_fused_experts(model, ""):
        if owner not in packed_owners and owner not in sequential and owner.rsplit(".", 2)[0] in blocks:
            layout.update(checkpoint_layout(model, owner) or {})
    return layout


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


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SeqgenError(f"cannot save to {out}: it is a file. Pass a directory path.")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise SeqgenError(
            f"cannot save to {out}: the directory is not empty and holds no model (no config.json), so it is not "
            "replaced. Pass a new or empty directory."
        )


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


class StreamingSaver:
    """Writes a checkpoint one subgraph at a time, for calibration with weights offloaded to disk.

    :meth:`add` runs while a subgraph's weights are on the execution device, right after it is quantized: its tensors
    (packed quantized weights, or dequantized ones for ``save_format="fake"``, plus the subgraph's other parameters)
    go to their own safetensors shard at once, so the quantized model never sits in RAM whole. :meth:`finish` copies
    the tensors no subgraph wrote (e.g. the final norm and ``lm_head``) from the source checkpoint, writes the shard
    index, ``config.json`` (with the ``quantization_config``), the tokenizer, and renames the directory into place.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        weights: Any,
        out_dir: str | Path,
        *,
        tokenizer: Any = None,
        save_format: str = "compressed",
    ) -> None:
        if save_format not in SAVE_FORMATS:
            raise SeqgenError(f"unknown save_format {save_format!r}; use one of {list(SAVE_FORMATS)}.")
        self.model = model
        self.weights = weights
        self.out = Path(out_dir)
        _check_target(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        self.save_format = save_format
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.weight_map: dict[str, str] = {}
        self.shapes: dict[str, QuantizedWeight] = {}  # metadata only (tensors on meta) for the quantization_config
        self.expert_shapes: dict[str, QuantizedWeight] = {}  # the same, for quantized fused experts
        self.packed: set[str] = set()  # source weights saved in packed form, so never copied from the checkpoint

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        file = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(self.tmp / file),
            metadata={"format": "pt"},
        )
        self.weight_map.update(dict.fromkeys(tensors, file))

    @staticmethod
    def _metadata(qweight: QuantizedWeight) -> QuantizedWeight:
        """``qweight`` with codes, scales and zero points on the meta device: their shapes and the scheme are all
        the ``quantization_config`` needs, and real scales would add up over a large model (2.75 MB per layer of a
        1B Llama at group size 64). ``g_idx`` stays: it is small and its values are checked."""
        import dataclasses

        def meta(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta")

        return dataclasses.replace(
            qweight, codes=meta(qweight.codes), scale=meta(qweight.scale), zero_point=meta(qweight.zero_point)
        )

    def add(
        self,
        subgraph: Any,
        quantized: Mapping[str, QuantizedWeight],
        experts: Mapping[str, QuantizedWeight] | None = None,
    ) -> None:
        """Save ``subgraph``'s tensors now (its weights are still on the execution device), under the names of the
        source checkpoint. ``experts`` are its quantized fused MoE experts, as in ``CalibrationResult.experts``."""
        from transformers.core_model_loading import revert_weight_conversion

        from .runtime.dispatch import _module_tensors

        experts = experts or {}
        modules = _resolve_modules(self.model, quantized)
        _resolve_experts(self.model, experts)
        compressed = self.save_format == "compressed"
        tensors: dict[str, torch.Tensor] = {}
        for name, qweight in quantized.items():
            if compressed:
                _check_groups(name, modules[name], qweight)
                source = self.weights.checkpoint_keys(f"{name}.weight")[0].removesuffix(".weight")
                for key, tensor in _compress(name, qweight, modules[name].weight.dtype).items():
                    tensors[f"{source}.{key}"] = tensor
            self.shapes[name] = self._metadata(qweight)
        expert_linears = _expert_linears(self.model, experts) if compressed else {}
        for name, linear in expert_linears.items():
            for key, tensor in _compress(name, linear.qweight, self.model.get_parameter(linear.param).dtype).items():
                tensors[f"{name}.{key}"] = tensor
        self.expert_shapes.update({key: self._metadata(qweight) for key, qweight in experts.items()})
        packed = {f"{name}.weight" for name in quantized} if compressed else set()
        packed |= {linear.param for linear in expert_linears.values()}
        for name in packed:
            self.packed.update(self.weights.checkpoint_keys(name))
        sequential = {
            f"{name}.{param}": name for name in _sequential_experts(self.model) if compressed for param in EXPERT_PARAMS
        }
        own = _module_tensors(self.model, subgraph)
        for name in sorted({owner for param, owner in sequential.items() if param in own and param not in packed}):
            module = self.model.get_submodule(name)
            tensors.update(_per_expert_weights(name, module.gate_up_proj, module.down_proj))
            for param in EXPERT_PARAMS:
                self.packed.update(self.weights.checkpoint_keys(f"{name}.{param}"))
        for name, (owner, attr) in own.items():
            if name not in self.weights or name in packed or name in sequential:
                continue
            value = getattr(owner, attr)
            for piece in self.weights.sources.get(name, [None]):
                key = name if piece is None else piece.key
                if key not in self.weight_map:
                    if piece is not None and piece.transposed:  # as transformers saves it: swapped, or not
                        tensors.update(revert_weight_conversion(self.model, {name: value}))
                    elif piece is None or piece.rows is None:  # under its own name, renamed, or tied
                        tensors[key] = value
                    else:  # some rows of the tensor (or of one expert's slice)
                        rows_of = value if piece.expert is None else value[piece.expert]
                        tensors[key] = rows_of.index_select(0, piece.rows.to(value.device))
        self._write(tensors)

    def finish(self) -> Path:
        """Copy what no subgraph wrote from the source checkpoint, write the metadata, move into place."""
        import json

        try:
            remaining = [
                name for name in self.weights.weight_map if name not in self.weight_map and name not in self.packed
            ]
            for start in range(0, len(remaining), 64):
                self._write(self.weights.read(remaining[start : start + 64], torch.device("cpu")))
            index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            source = self.weights.directory
            for extra in ("config.json", "generation_config.json"):
                if (source / extra).exists():
                    shutil.copyfile(source / extra, self.tmp / extra)
            _copy_serving_files(source, self.tmp)
            if self.save_format == "compressed" and (self.shapes or self.expert_shapes):
                from compressed_tensors.compressors import ModelCompressor

                config = quantization_config(self.model, self.shapes, experts=self.expert_shapes)
                ModelCompressor(quantization_config=config).update_config(str(self.tmp))
                _warn_dense_tensors_transformers_drops(self.model, self.tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(self.tmp)
            _move_into_place(self.tmp, self.out)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        logger.info(
            "saved %s (%s format, streamed) to %s",
            _counts(len(self.shapes), len(self.expert_shapes)),
            self.save_format,
            self.out,
        )
        return self.out
