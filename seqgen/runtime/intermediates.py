"""Values that flow between subgraphs, per calibration batch.

For each batch the cache holds exactly the names the index says are live: the batch's inputs, then each subgraph's
outputs; a subgraph's consumed names are deleted as soon as it has run. On a CUDA device values wait on the CPU
(pinned) between subgraphs and move to the device only for the subgraph that reads them; on the CPU nothing moves.

With a ``spill_dir`` the values wait on disk instead: each (batch, name) is one safetensors file, written when the
value is produced, read back when a subgraph needs it and deleted when the index says it is consumed. RAM then holds
one batch's values at a time, for calibration sets whose activations do not fit in memory.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SeqgenError
from ..faults import fault_point
from ..package import Subgraph

__all__ = [
    "SPILL_PREFIX",
    "IntermediatesCache",
    "StopBatch",
    "flatten",
    "move",
    "template_from_json",
    "template_to_json",
    "unflatten",
]

# A spill directory is ``SPILL_PREFIX<pid>-<random>`` under ``spill_dir``: those of killed processes are removed by the
# next calibration that spills there (seqgen.preflight).
SPILL_PREFIX = "seqgen-intermediates-"


class StopBatch(Exception):
    """Raised by a calibration hook once a batch has given everything it is needed for (the inputs of the last
    linear); :meth:`IntermediatesCache.run` then skips the rest of the subgraph for that batch."""


def move(value: Any, device: torch.device, pin: bool = False) -> Any:
    """``value`` with every tensor in it (tuples, lists, dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if pin and device.type == "cpu":
            out = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=True)
            return out.copy_(value, non_blocking=True)
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(move(v, device, pin) for v in value)
    if isinstance(value, list):
        return [move(v, device, pin) for v in value]
    if isinstance(value, dict):
        return _rebuild_mapping(value, {k: move(v, device, pin) for k, v in value.items()})
    return value


@dataclass(frozen=True)
class _Spilled:
    """A value written to ``file``: its tensors under the keys "0", "1", ... in the order :func:`flatten` visits
    them; ``template`` is the value with each tensor replaced by its key (other leaves kept as they are)."""

    file: Path
    template: Any


class _Key(str):
    """A tensor's key in a spilled value's file (a str subclass, so a real string leaf is never mistaken for one)."""


def _rebuild(like: Any, items: list[Any]) -> Any:
    """A tuple or list of ``like``'s type (named tuples included) holding ``items``."""
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)


def _rebuild_mapping(like: dict, items: dict[str, Any]) -> dict:
    """A dict of ``like``'s type holding ``items``: a model output (a dataclass dict, such as a vision tower's output
    handed to the next subgraph) stays one, so the code after it can read its fields as attributes."""
    if type(like) is dict:
        return items
    return type(like)(**items) if is_dataclass(like) else type(like)(items)


def flatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value``'s template: each tensor in it (tuples, lists, dicts) appended to ``tensors`` and replaced by its key
    there, ``"0"``, ``"1"``, ... (a :class:`_Key`); other leaves are kept as they are."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return _Key(str(len(tensors) - 1))
    if isinstance(value, (tuple, list)):
        return _rebuild(value, [flatten(v, tensors) for v in value])
    if isinstance(value, dict):
        return _rebuild_mapping(value, {k: flatten(v, tensors) for k, v in value.items()})
    return value


def unflatten(template: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The value of :func:`flatten`'s ``template``, its tensors taken from ``tensors`` by key."""
    if isinstance(template, _Key):
        return tensors[template]
    if isinstance(template, (tuple, list)):
        return _rebuild(template, [unflatten(v, tensors) for v in template])
    if isinstance(template, dict):
        return _rebuild_mapping(template, {k: unflatten(v, tensors) for k, v in template.items()})
    return template


def template_to_json(template: Any, name: str) -> Any:
    """:func:`flatten`'s ``template`` of value ``name`` as JSON data (for a checkpoint). Tensors, tuples, lists,
    dicts with string keys, None, booleans, numbers and strings are written; anything else raises SeqgenError."""
    if isinstance(template, _Key):
        return {"tensor": str(template)}
    if template is None or isinstance(template, (bool, int, float, str)):
        return template
    if isinstance(template, (tuple, list)) and not hasattr(template, "_fields"):
        return {type(template).__name__: [template_to_json(v, name) for v in template]}
    if isinstance(template, dict) and all(isinstance(k, str) for k in template):
        return {"dict": {k: template_to_json(v, name) for k, v in template.items()}}
    raise SeqgenError(
        f"the value {name!r} that flows between subgraphs holds a {type(template).__name__}, which a checkpoint "
        "cannot store. Calibrate without checkpoints (--checkpoint-every 0)."
    )


def template_from_json(data: Any) -> Any:
    """The template that :func:`template_to_json` wrote as ``data``."""
    if not isinstance(data, dict):
        return data
    ((kind, inner),) = data.items()
    if kind == "tensor":
        return _Key(inner)
    if kind == "dict":
        return {k: template_from_json(v) for k, v in inner.items()}
    items = [template_from_json(v) for v in inner]
    return tuple(items) if kind == "tuple" else items


def value_file_name(i: int, name: str) -> str:
    """The file name of batch ``i``'s value ``name`` (spilled, or in a checkpoint)."""
    return f"b{i:05d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.safetensors"


def savable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` contiguous on the CPU, none sharing memory with another (safetensors refuses that)."""
    seen: set[int] = set()
    flat = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        flat[key] = tensor
    return flat


def _keyed(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`flatten`'s tensors by their keys in its template."""
    return {str(key): tensor for key, tensor in enumerate(tensors)}


class IntermediatesCache:
    def __init__(
        self, batches: list[Mapping[str, Any]], device: torch.device, spill_dir: str | Path | None = None
    ) -> None:
        self.device = device
        self.storage = torch.device("cpu")
        self.pin = device.type == "cuda" and spill_dir is None
        self.batches = [dict(b) for b in batches]
        self.spill: Path | None = None
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
            # named after this process, so that a later run can tell a killed run's files (see SPILL_PREFIX)
            self.spill = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=spill_dir))
        self.values: list[dict[str, Any]] = []
        for i, batch in enumerate(self.batches):
            self.values.append({})
            self._store(i, batch)

    def close(self) -> None:
        """Delete the spilled files (a no-op without ``spill_dir``); the cache is empty afterwards."""
        self.values = [{} for _ in self.values]
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)

    def _store(self, i: int, values: Mapping[str, Any]) -> None:
        if self.spill is None:
            self.values[i].update(move(dict(values), self.storage, self.pin))
            return
        from safetensors.torch import save_file

        for name, value in values.items():
            tensors: list[torch.Tensor] = []
            template = flatten(value, tensors)
            file = self.spill / value_file_name(i, name)
            partial = file.with_suffix(".partial")
            save_file(savable(_keyed(tensors)), str(partial))
            os.replace(partial, file)
            self.values[i][name] = _Spilled(file, template)

    def _load(self, value: Any) -> Any:
        if not isinstance(value, _Spilled):
            return move(value, self.device)
        from safetensors.torch import load_file

        return unflatten(value.template, load_file(str(value.file), device=str(self.device)))

    def _delete(self, i: int, name: str) -> None:
        value = self.values[i].pop(name)
        if isinstance(value, _Spilled):
            value.file.unlink(missing_ok=True)

    def export(self, i: int) -> dict[str, tuple[Any, dict[str, torch.Tensor] | Path]]:
        """Batch ``i``'s values for a checkpoint: each as its :func:`flatten` template and either its tensors by key
        (on the CPU, ready for safetensors) or, when spilled, the file that holds them."""
        exported: dict[str, tuple[Any, dict[str, torch.Tensor] | Path]] = {}
        for name, value in self.values[i].items():
            if isinstance(value, _Spilled):
                exported[name] = (value.template, value.file)
            else:
                tensors: list[torch.Tensor] = []
                exported[name] = (flatten(value, tensors), savable(_keyed(tensors)))
        return exported

    def restore(self, i: int, values: Mapping[str, Any]) -> None:
        """Make ``values`` batch ``i``'s values, in place of what it holds (resuming from a checkpoint)."""
        for name in list(self.values[i]):
            self._delete(i, name)
        self._store(i, values)

    def __len__(self) -> int:
        return len(self.values)

    def run(
        self,
        model: torch.nn.Module,
        subgraph: Subgraph,
        *,
        commit: bool,
        before_batch: Callable[[int], None] | None = None,
        progress: Callable[[], None] | None = None,
    ) -> None:
        """Run ``subgraph`` on every batch. ``commit``: replace its consumed inputs by its outputs; otherwise the
        outputs are dropped (a calibration pass whose propagation pass comes later)."""
        for i in range(len(self.values)):
            fault_point("pass")
            if before_batch is not None:
                before_batch(i)
            inputs = self.inputs(i, subgraph)
            try:
                outputs = subgraph.forward(model, **inputs)
            except StopBatch:
                if commit:
                    raise
                outputs = None
            del inputs
            if commit:
                for name in subgraph.consumed:
                    self._delete(i, name)
                self._store(i, outputs)
            del outputs
            if progress is not None:
                progress()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def inputs(self, i: int, subgraph: Subgraph) -> dict[str, Any]:
        """Batch ``i``'s values that ``subgraph`` reads, on the device (the cache is unchanged)."""
        return {name: self._load(self.values[i][name]) for name in subgraph.inputs}

    def attention_mask(self, i: int) -> torch.Tensor | None:
        mask = self.batches[i].get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) else None

    def nbytes(self) -> int:
        """Bytes of the values held in memory (spilled values count as nothing)."""

        def size(value: Any) -> int:
            if isinstance(value, torch.Tensor):
                return value.numel() * value.element_size()
            if isinstance(value, (tuple, list)):
                return sum(size(v) for v in value)
            if isinstance(value, dict):
                return sum(size(v) for v in value.values())
            return 0

        return sum(size(v) for v in self.values)
