"""Values that flow between subgraphs, per calibration batch.

For each batch the cache holds exactly the names the index says are live: the batch's inputs, then each subgraph's
outputs; a subgraph's consumed names are deleted as soon as it has run. On a CUDA device values wait on the CPU
(pinned) between subgraphs and move to the device only for the subgraph that reads them; on the CPU nothing moves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..package import Subgraph

__all__ = ["IntermediatesCache", "StopBatch", "move"]


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
        return {k: move(v, device, pin) for k, v in value.items()}
    return value


class IntermediatesCache:
    def __init__(self, batches: list[Mapping[str, Any]], device: torch.device) -> None:
        self.device = device
        self.storage = torch.device("cpu")
        self.pin = device.type == "cuda"
        self.batches = [dict(b) for b in batches]
        self.values: list[dict[str, Any]] = [move(dict(b), self.storage, self.pin) for b in batches]

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
        for i, values in enumerate(self.values):
            if before_batch is not None:
                before_batch(i)
            inputs = {name: move(values[name], self.device) for name in subgraph.inputs}
            try:
                outputs = subgraph.forward(model, **inputs)
            except StopBatch:
                if commit:
                    raise
                outputs = None
            del inputs
            if commit:
                for name in subgraph.consumed:
                    del values[name]
                values.update(move(outputs, self.storage, self.pin))
            del outputs
            if progress is not None:
                progress()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def attention_mask(self, i: int) -> torch.Tensor | None:
        mask = self.batches[i].get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) else None

    def nbytes(self) -> int:
        def size(value: Any) -> int:
            if isinstance(value, torch.Tensor):
                return value.numel() * value.element_size()
            if isinstance(value, (tuple, list)):
                return sum(size(v) for v in value)
            if isinstance(value, dict):
                return sum(size(v) for v in value.values())
            return 0

        return sum(size(v) for v in self.values)
