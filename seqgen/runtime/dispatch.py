"""Weights on the execution device one subgraph at a time.

The index lists, per subgraph, every module it calls and every parameter it reads directly; the dispatcher moves
exactly those to the execution device before the subgraph runs and back after. Two homes for the weights:

* **memory**: the model sits on the CPU (RAM). On a CUDA device the CPU copies are pinned, so copies are asynchronous,
  and :meth:`Dispatcher.prefetch` starts copying the *next* subgraph's weights on a side stream while the current one
  computes. On the CPU there is nothing to move.
* **disk**: the model skeleton has its parameters on the meta device, and tensors are read from the checkpoint's
  safetensors files (memory-mapped) when a subgraph needs them, then dropped. RAM holds one subgraph's weights, so a
  model larger than RAM calibrates. Checkpoint names and layouts that differ from the model's (fused MoE experts
  stored one linear per expert, or transposed; renamed modules; split rows) are resolved by
  :class:`seqgen.checkpoint.SafetensorsWeights`. :meth:`Dispatcher.prefetch` asks the kernel to read the next
  subgraph's byte ranges into the page cache while the current one computes (``posix_fadvise(WILLNEED)``): the reads
  overlap compute, and nothing is added to the process's memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..errors import SeqgenError
from ..package import Subgraph

if TYPE_CHECKING:
    from ..checkpoint import SafetensorsWeights

__all__ = ["Dispatcher", "execution_device", "subgraph_tensors"]

logger = logging.getLogger(__name__)


def execution_device(requested: str | torch.device | None = None) -> torch.device:
    """``cuda:0`` when CUDA exists, else the CPU, unless ``requested`` says otherwise."""
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def subgraph_tensors(model: torch.nn.Module, subgraph: Subgraph) -> dict[str, tuple[torch.nn.Module, str]]:
    """Every parameter and buffer a subgraph uses: full name -> (owning module, attribute name)."""
    found: dict[str, tuple[torch.nn.Module, str]] = {}
    for module_name in subgraph.modules:
        module = model.get_submodule(module_name)
        prefix = f"{module_name}." if module_name else ""
        for sub_name, sub in module.named_modules():
            sub_prefix = f"{prefix}{sub_name}." if sub_name else prefix
            for attr, _ in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
                found.setdefault(sub_prefix + attr, (sub, attr))
    for tensor_name in subgraph.tensors:
        owner_name, _, attr = tensor_name.rpartition(".")
        found.setdefault(tensor_name, (model.get_submodule(owner_name), attr))
    return found


def _set_tensor(owner: torch.nn.Module, attr: str, value: torch.Tensor) -> None:
    """Make ``value`` the tensor of ``owner.<attr>``. A parameter keeps its identity (its ``.data`` is swapped), so
    tied weights stay tied and outside references stay valid; only to or from the meta device (disk offload's
    skeleton), where ``.data`` cannot be swapped, is the parameter replaced."""
    current = getattr(owner, attr)
    if not isinstance(current, torch.nn.Parameter):
        owner._buffers[attr] = value
    elif current.device.type != "meta" and value.device.type != "meta":
        current.data = value
    else:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)


def _unaliased(tensors: dict[str, tuple[torch.nn.Module, str]]) -> dict[str, tuple[torch.nn.Module, str]]:
    """``tensors`` without the later names of one tensor object (tied weights): moving it once moves them all."""
    seen: set[int] = set()
    kept: dict[str, tuple[torch.nn.Module, str]] = {}
    for name, (owner, attr) in tensors.items():
        current = getattr(owner, attr)
        if current.device.type == "meta" or id(current) not in seen:  # a meta skeleton's aliases load one by one
            kept[name] = (owner, attr)
        seen.add(id(current))
    return kept


class Dispatcher:
    """Onloads and offloads the weights of one subgraph at a time (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, weights: SafetensorsWeights | None = None) -> None:
        self.model = model
        self.device = device
        self.weights = weights
        self.moves = device.type != "cpu" or weights is not None
        self._home: dict[str, torch.Tensor] = {}  # memory mode on an accelerator: the pinned CPU copy
        self._staged: dict[str, torch.Tensor] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staged_event: torch.cuda.Event | None = None
        self.bytes_moved = 0

    @contextmanager
    def resident(self, subgraph: Subgraph, next_subgraph: Subgraph | None = None) -> Iterator[None]:
        """Weights of ``subgraph`` on the device for the duration; the next one's prefetched meanwhile."""
        self.onload(subgraph)
        if next_subgraph is not None:
            self.prefetch(next_subgraph)
        try:
            yield
        finally:
            self.offload(subgraph)

    def _source(self, name: str, owner: torch.nn.Module, attr: str) -> torch.Tensor | None:
        """The home copy of a tensor, or None if the module's own (non-persistent buffer) value is the source."""
        current = getattr(owner, attr)
        if self.weights is not None:
            if name in self.weights:
                return None  # read from disk
            if current.device.type == "meta":
                raise SeqgenError(
                    f"{name} is neither in the checkpoint {self.weights.directory} nor initialised; the checkpoint "
                    "does not match the model."
                )
        home = self._home.get(name)
        if home is None:
            home = current.data if current.device.type == "cpu" else current.data.cpu()
            if self.device.type == "cuda":
                home = home.pin_memory()
            self._home[name] = home
        return home

    def prefetch(self, subgraph: Subgraph) -> None:
        """Start moving ``subgraph``'s weights closer while the current subgraph computes: in disk mode the kernel
        reads their bytes into the page cache; in memory mode on CUDA they are copied to the device on a side
        stream. Nothing to do in memory mode on the CPU."""
        if self.weights is not None:
            self.weights.prefetch(n for n in subgraph_tensors(self.model, subgraph) if n in self.weights)
            return
        if self._stream is None:
            return
        tensors = _unaliased(subgraph_tensors(self.model, subgraph))
        with torch.cuda.stream(self._stream):
            for name, (owner, attr) in tensors.items():
                source = self._source(name, owner, attr)
                if source is not None:
                    self._staged[name] = source.to(self.device, non_blocking=True)
            self._staged_event = torch.cuda.Event()
            self._staged_event.record(self._stream)

    def check(self, subgraphs: Iterable[Subgraph]) -> None:
        """Before anything runs: raise if disk offload could not read a tensor that ``subgraphs`` use."""
        if self.weights is not None:
            self.weights.check(name for subgraph in subgraphs for name in subgraph_tensors(self.model, subgraph))

    def onload(self, subgraph: Subgraph) -> None:
        if not self.moves:
            return
        tensors = _unaliased(subgraph_tensors(self.model, subgraph))
        if self._staged_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._staged_event)
            self._staged_event = None
        from_disk = [n for n in tensors if self.weights is not None and n in self.weights]
        if from_disk:
            self.weights.check(from_disk)
        loaded = self.weights.read(from_disk, self.device) if from_disk else {}
        for name, (owner, attr) in tensors.items():
            if name in loaded:
                value = loaded[name]
            elif name in self._staged:
                value = self._staged.pop(name)
            else:
                source = self._source(name, owner, attr)
                if source is None:  # an initialised non-persistent buffer in disk mode
                    source = getattr(owner, attr).data
                value = source.to(self.device, non_blocking=True)
            current = getattr(owner, attr)
            if value.dtype != current.dtype:  # the skeleton (or the loaded model) sets the dtype
                value = value.to(current.dtype)
            self.bytes_moved += value.numel() * value.element_size()
            _set_tensor(owner, attr, value)
        self._staged.clear()

    def offload(self, subgraph: Subgraph, changed: Iterable[str] = ()) -> None:
        """Return ``subgraph``'s weights home. ``changed`` names tensors rewritten on the device (quantized weights):
        in memory mode they are copied back into their home copy; in disk mode the caller saved them already."""
        if not self.moves:
            return
        tensors = subgraph_tensors(self.model, subgraph)
        rewritten = {id(getattr(*tensors[name])) for name in changed if name in tensors}  # by object: aliases too
        for name, (owner, attr) in _unaliased(tensors).items():
            current = getattr(owner, attr)
            if self.weights is not None and name in self.weights:
                _set_tensor(owner, attr, torch.empty_like(current, device="meta"))
                continue
            home = self._home.get(name)
            if home is None:
                continue
            if id(current) in rewritten:
                home.copy_(current.data)
            _set_tensor(owner, attr, home)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
