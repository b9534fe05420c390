"""The files of a checkpoint: quantized weights and activation statistics in safetensors, each written whole or not
at all (to a file beside it, then renamed), and files shared with another directory by hard link."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ..algorithms import QuantizedWeight, QuantScheme
from ..faults import fault_point
from ..runtime.intermediates import savable

__all__ = ["link_or_copy", "load_quantized", "load_stats", "save_quantized_groups", "save_stats", "save_tensors"]

_FIELDS = ("codes", "scale", "zero_point", "g_idx")


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to the safetensors file ``path``, whole or not at all."""
    from safetensors.torch import save_file

    fault_point("checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file(savable(tensors), str(partial), metadata=metadata)
    os.replace(partial, path)


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` a hard link to ``source`` (no bytes copied), or a copy across filesystems."""
    fault_point("checkpoint")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):  # no hard links here: copy
            raise
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)


def save_quantized_groups(groups: Mapping[str, Mapping[str, QuantizedWeight]], path: Path) -> None:
    """Write quantized weights, in named groups (``linears``, ``experts``), to ``path``. A tensor on the meta device
    (the streaming save keeps only the shapes of what it wrote) is stored as its shape and dtype."""
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, dict]] = {}
    for group, weights in groups.items():
        described[group] = {}
        for name, qweight in weights.items():
            entry: dict = {"scheme": dataclasses.asdict(qweight.scheme)}
            for field in _FIELDS:
                tensor = getattr(qweight, field)
                if tensor is None:
                    entry[field] = None
                elif tensor.device.type == "meta":
                    entry[field] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
                else:
                    entry[field] = "stored"
                    tensors[f"{group}/{name}/{field}"] = tensor
            described[group][name] = entry
    save_tensors(tensors, path, {"quantized": json.dumps(described)})


def load_quantized(path: Path) -> dict[str, dict[str, QuantizedWeight]]:
    """The groups of quantized weights that :func:`save_quantized_groups` wrote to ``path``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        described = json.loads(f.metadata()["quantized"])
        groups: dict[str, dict[str, QuantizedWeight]] = {}
        for group, weights in described.items():
            groups[group] = {}
            for name, entry in weights.items():
                fields = {}
                for field in _FIELDS:
                    spec = entry[field]
                    if spec == "stored":
                        fields[field] = f.get_tensor(f"{group}/{name}/{field}")
                    elif spec is None:
                        fields[field] = None
                    else:
                        fields[field] = torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]), device="meta")
                groups[group][name] = QuantizedWeight(**fields, scheme=QuantScheme(**entry["scheme"]))
    return groups


def save_stats(stats: Mapping[str, Mapping[str, torch.Tensor]], path: Path) -> None:
    """Write activation statistics (module -> name -> tensor) to ``path``."""
    save_tensors({f"{module}/{key}": value for module, values in stats.items() for key, value in values.items()}, path)


def load_stats(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        module, _, name = key.rpartition("/")
        stats.setdefault(module, {})[name] = value
    return stats
