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

``save_format="fake"`` writes the dequantized weights as an ordinary checkpoint (no ``quantization_config``), for
tools that know no quantized format.

Either way the directory is written to a temporary sibling and renamed into place, so a failed or killed save never
leaves a half-written checkpoint under ``out_dir``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import SeqgenError

if TYPE_CHECKING:
    from .algorithms.base import QuantizedWeight

__all__ = ["SAVE_FORMATS", "save_quantized", "apply_fake_quant", "quantization_config", "StreamingSaver"]

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("compressed", "fake")
PACK_FORMAT = "pack-quantized"


def apply_fake_quant(model: torch.nn.Module, quantized: Mapping[str, QuantizedWeight]) -> None:
    """Overwrite each quantized Linear's weight, in place, with its dequantized value (one layer at a time)."""
    modules = _resolve_modules(model, quantized)
    with torch.no_grad():
        for name, qweight in quantized.items():
            weight = modules[name].weight
            weight.copy_(qweight.dequantize(dtype=weight.dtype).to(weight.device))


def save_quantized(
    model: torch.nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    save_format: str = "compressed",
    max_shard_size: int | str = "5GB",
) -> Path:
    """Save ``model`` with the Linear weights of ``quantized`` (module name -> QuantizedWeight) quantized.

    ``"compressed"`` leaves ``model`` untouched and stores only the packed codes and scales of the quantized layers
    next to references to the other parameters: no second copy of the weights is made. ``"fake"`` first writes the
    dequantized weights into ``model`` in place (see :func:`apply_fake_quant`; a no-op when they are there already),
    then saves it as a plain checkpoint. ``tokenizer``, when given, is saved alongside. An existing ``out_dir`` is
    replaced when it is empty or holds a model (a ``config.json``). Returns the directory.
    """
    if save_format not in SAVE_FORMATS:
        raise SeqgenError(f"unknown save_format {save_format!r}; use one of {list(SAVE_FORMATS)}.")
    if not quantized:
        raise SeqgenError("save_quantized got no quantized layers; quantize the model first (or save it as it is).")
    if getattr(model.config, "quantization_config", None) is not None:
        raise SeqgenError(
            f"{type(model).__name__} already has a quantization_config in its config; "
            "quantize a model loaded from unquantized (fp16/bf16/fp32) weights."
        )
    out = Path(out_dir)
    _check_target(out)
    modules = _resolve_modules(model, quantized)
    if save_format == "compressed":
        # validate every layer before anything is written
        config = quantization_config(model, quantized)
        state_dict = _compressed_state_dict(model, quantized, modules)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if save_format == "compressed":
            from compressed_tensors.compressors import ModelCompressor

            model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
            del state_dict
            ModelCompressor(quantization_config=config).update_config(str(tmp))
        else:
            apply_fake_quant(model, quantized)
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %d quantized layers (%s format) to %s", len(quantized), save_format, out)
    return out


def quantization_config(model: torch.nn.Module, quantized: Mapping[str, QuantizedWeight]) -> Any:
    """The compressed-tensors ``QuantizationConfig`` (pack-quantized, status compressed) for ``quantized``.

    One config group per distinct scheme: with a single scheme its targets are ``["Linear"]``, with several each
    group lists its module names. ``ignore`` names every Linear of ``model`` that is not quantized (e.g. ``lm_head``).
    """
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    modules = _resolve_modules(model, quantized)
    by_args: dict[str, tuple[Any, list[str]]] = {}
    for name, qweight in quantized.items():
        _check_groups(name, modules[name], qweight)
        args = _quantization_args(name, qweight)
        key = args.model_dump_json()
        by_args.setdefault(key, (args, []))[1].append(name)
    groups = {}
    for index, (args, names) in enumerate(by_args.values()):
        targets = ["Linear"] if len(by_args) == 1 else sorted(names)
        groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=args, format=PACK_FORMAT)
    ignore = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name and name not in quantized
    ]
    return QuantizationConfig(
        config_groups=groups,
        format=PACK_FORMAT,
        quantization_status="compressed",
        ignore=ignore,
    )


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


def _check_groups(name: str, module: torch.nn.Linear, qweight: QuantizedWeight) -> int:
    """The number of scale groups; raises when the layout is one compressed-tensors cannot store."""
    scheme = qweight.scheme
    out_features, in_features = module.weight.shape
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


def _compressed_state_dict(
    model: torch.nn.Module, quantized: Mapping[str, QuantizedWeight], modules: Mapping[str, torch.nn.Linear]
) -> dict[str, torch.Tensor]:
    """The model's state dict (references, not copies) with each quantized weight replaced by its packed form."""
    state_dict = model.state_dict()
    for name, qweight in quantized.items():
        weight = modules[name].weight
        own = f"{name}.weight"
        shared = [key for key, value in state_dict.items() if key != own and _same_storage(value, weight)]
        if shared:
            raise SeqgenError(
                f"{name}.weight shares its storage with {shared} (tied weights); a tied weight cannot be stored "
                "quantized in one place and dense in the other. Leave this layer unquantized."
            )
        state_dict.pop(own)
        for key, tensor in _compress(name, qweight, weight.dtype).items():
            state_dict[f"{name}.{key}"] = tensor
    return state_dict


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.device.type == "meta":
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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

    def __init__(self, model: torch.nn.Module, weights: Any, out_dir: str | Path, *, tokenizer: Any = None,
                 save_format: str = "compressed") -> None:
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
        self.shapes: dict[str, QuantizedWeight] = {}  # metadata only (codes on meta) for the quantization_config

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        file = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.tmp / file),
                  metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, file))

    def add(self, subgraph: Any, quantized: Mapping[str, QuantizedWeight]) -> None:
        """Save ``subgraph``'s tensors now (its weights are still on the execution device)."""
        import dataclasses

        from .runtime.dispatch import _module_tensors

        modules = _resolve_modules(self.model, quantized)
        tensors: dict[str, torch.Tensor] = {}
        for name, qweight in quantized.items():
            if self.save_format == "compressed":
                _check_groups(name, modules[name], qweight)
                for key, tensor in _compress(name, qweight, modules[name].weight.dtype).items():
                    tensors[f"{name}.{key}"] = tensor
            self.shapes[name] = dataclasses.replace(qweight, codes=torch.empty(qweight.codes.shape, device="meta"))
        packed = {f"{name}.weight" for name in quantized} if self.save_format == "compressed" else set()
        for name, (owner, attr) in _module_tensors(self.model, subgraph).items():
            if name in self.weights and name not in packed and name not in self.weight_map:
                tensors[name] = getattr(owner, attr)
        self._write(tensors)

    def finish(self) -> Path:
        """Copy what no subgraph wrote from the source checkpoint, write the metadata, move into place."""
        import json

        try:
            remaining = [name for name in self.weights.weight_map if name not in self.weight_map]
            for start in range(0, len(remaining), 64):
                self._write(self.weights.read(remaining[start : start + 64], torch.device("cpu")))
            index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            source = self.weights.directory
            for extra in ("config.json", "generation_config.json"):
                if (source / extra).exists():
                    shutil.copyfile(source / extra, self.tmp / extra)
            if self.save_format == "compressed" and self.shapes:
                from compressed_tensors.compressors import ModelCompressor

                config = quantization_config(self.model, self.shapes)
                ModelCompressor(quantization_config=config).update_config(str(self.tmp))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(self.tmp)
            _move_into_place(self.tmp, self.out)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        logger.info("saved %d quantized layers (%s format, streamed) to %s", len(self.shapes), self.save_format,
                    self.out)
        return self.out
