"""Write a checkpoint one subgraph at a time, while a calibration with weights offloaded to disk runs.

The same checkpoint as ``writing.py``'s, written without the quantized model ever sitting in RAM whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SeqgenError
from ..faults import fault_point
from ..outputs import check_output, write_manifest
from ..runtime.dispatch import subgraph_tensors
from ..runtime.experts import EXPERT_PARAMS
from .atomic import atomic_directory
from .compressed import quantization_config, write_quantization_config
from .formats import weight_tensors
from .keys import resolve_experts, resolve_modules
from .layout import expert_linears, per_expert_weights, sequential_experts
from .packing import check_groups
from .writing import check_save_format, copy_serving_files, counts_text

if TYPE_CHECKING:
    from ..algorithms.base import QuantizedWeight
    from ..package import Subgraph
    from .reading import SafetensorsWeights

__all__ = ["StreamingSaver"]

logger = logging.getLogger(__name__)


class StreamingSaver:
    """Writes a checkpoint one subgraph at a time, for calibration with weights offloaded to disk. It is a context
    manager around the calibration::

        with StreamingSaver(skeleton, weights, out) as saver:
            calibrate(skeleton, package, batches, options, weights=weights, on_subgraph_done=saver.add)

    The checkpoint is written to a temporary directory beside ``out`` (see :func:`~seqgen.checkpoint.atomic_directory`).
    :meth:`add` runs while a subgraph's weights are on the execution device, right after it is quantized: its tensors
    (packed quantized weights, or dequantized ones for ``save_format="fake"``, plus the subgraph's other parameters)
    go to their own safetensors shard at once. When the block ends without an exception, the tensors no subgraph wrote
    (e.g. the final norm and ``lm_head``) are copied from the source checkpoint, the shard index, ``config.json`` (with
    the ``quantization_config``) and the tokenizer are written, and the directory is renamed to ``out``. On an
    exception, or Ctrl-C, the temporary directory is removed and ``out`` is left as it was. ``out`` is refused up
    front as :func:`seqgen.outputs.check_output` says (an existing seqgen output is replaced only with ``overwrite``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        weights: SafetensorsWeights,
        out_dir: str | Path,
        *,
        tokenizer: Any = None,
        save_format: str = "compressed",
        overwrite: bool = False,
    ) -> None:
        check_save_format(save_format)
        self.model = model
        self.weights = weights
        self.out = Path(out_dir)
        check_output(self.out, overwrite=overwrite, inputs=[weights.directory])
        self.tokenizer = tokenizer
        self.save_format = save_format
        self.tmp: Path | None = None  # the checkpoint being written, inside the with block
        self._directory: ExitStack | None = None  # what renames ``tmp`` into place, or removes it
        self.weight_map: dict[str, str] = {}
        self.shapes: dict[str, QuantizedWeight] = {}  # metadata only (tensors on meta) for the quantization_config
        self.expert_shapes: dict[str, QuantizedWeight] = {}  # the same, for quantized fused experts
        self.packed: set[str] = set()  # source weights saved in packed form, so never copied from the checkpoint

    def __enter__(self) -> StreamingSaver:
        with ExitStack() as stack:
            self.tmp = stack.enter_context(atomic_directory(self.out, replace=True))
            self._directory = stack.pop_all()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        directory, self._directory = self._directory, None
        if directory is None:
            return
        try:
            if exc_type is not None:
                directory.__exit__(exc_type, exc, tb)  # removes the temporary directory; the exception goes on
                return
            with directory:  # renames the finished checkpoint into place, or removes it if finishing fails
                self._finish()
        finally:
            self.tmp = None  # add() after the block is an error, not a write into a directory that is gone
        logger.info(
            "saved %s (%s format, streamed) to %s",
            counts_text(len(self.shapes), len(self.expert_shapes)),
            self.save_format,
            self.out,
        )

    def add(
        self,
        subgraph: Subgraph,
        quantized: Mapping[str, QuantizedWeight],
        experts: Mapping[str, QuantizedWeight] | None = None,
    ) -> None:
        """Save ``subgraph``'s tensors now (its weights are still on the execution device), under the names of the
        source checkpoint. ``experts`` are its quantized fused MoE experts, as in ``CalibrationResult.experts``."""
        if self.tmp is None:
            raise SeqgenError(
                "StreamingSaver.add ran outside its with block, which holds the directory it writes to. Call it "
                "inside `with StreamingSaver(...) as saver:`."
            )
        tensors, packed = self._quantized_tensors(quantized, experts or {})
        tensors.update(self._dense_tensors(subgraph, packed))
        self._write(tensors)

    def _quantized_tensors(
        self, quantized: Mapping[str, QuantizedWeight], experts: Mapping[str, QuantizedWeight]
    ) -> tuple[dict[str, torch.Tensor], set[str]]:
        """The packed tensors of ``quantized`` and ``experts`` under the source checkpoint's names (none for
        ``"fake"``: the model holds them dequantized), and the model tensors they stand for."""
        modules = resolve_modules(self.model, quantized)
        resolve_experts(self.model, experts)
        compressed = self.save_format == "compressed"
        tensors: dict[str, torch.Tensor] = {}
        for name, qweight in quantized.items():
            if compressed:
                check_groups(name, modules[name], qweight)
                source = self.weights.checkpoint_keys(f"{name}.weight")[0].removesuffix(".weight")
                for key, tensor in weight_tensors(name, qweight, modules[name].weight.dtype).items():
                    tensors[f"{source}.{key}"] = tensor
            self.shapes[name] = _metadata(qweight)
        linears = expert_linears(self.model, experts) if compressed else {}
        for name, linear in linears.items():
            dtype = self.model.get_parameter(linear.param).dtype
            for key, tensor in weight_tensors(name, linear.qweight, dtype).items():
                tensors[f"{name}.{key}"] = tensor
        self.expert_shapes.update({key: _metadata(qweight) for key, qweight in experts.items()})
        packed = {f"{name}.weight" for name in quantized} if compressed else set()
        packed |= {linear.param for linear in linears.values()}
        for name in packed:
            self.packed.update(self.weights.checkpoint_keys(name))
        return tensors, packed

    def _dense_tensors(self, subgraph: Subgraph, packed: set[str]) -> dict[str, torch.Tensor]:
        """``subgraph``'s other tensors, not yet written, as the source checkpoint stores them (Llama 4's experts
        left unquantized: as one linear per expert, see ``layout.SEQUENTIAL_EXPERTS``)."""
        from transformers.core_model_loading import revert_weight_conversion

        compressed = self.save_format == "compressed"
        tensors: dict[str, torch.Tensor] = {}
        sequential = {
            f"{name}.{param}": name for name in sequential_experts(self.model) if compressed for param in EXPERT_PARAMS
        }
        own = subgraph_tensors(self.model, subgraph)
        for name in sorted({owner for param, owner in sequential.items() if param in own and param not in packed}):
            module = self.model.get_submodule(name)
            tensors.update(per_expert_weights(name, module.gate_up_proj, module.down_proj))
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
        return tensors

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

    def _finish(self) -> None:
        """Copy what no subgraph wrote from the source checkpoint, and write the index and the metadata."""
        remaining = [
            name for name in self.weights.weight_map if name not in self.weight_map and name not in self.packed
        ]
        for start in range(0, len(remaining), 64):
            self._write(self.weights.read(remaining[start : start + 64], torch.device("cpu")))
        fault_point("save")
        index = {"metadata": {}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        source = self.weights.directory
        for extra in ("config.json", "generation_config.json"):
            if (source / extra).exists():
                shutil.copyfile(source / extra, self.tmp / extra)
        copy_serving_files(source, self.tmp)
        if self.save_format == "compressed" and (self.shapes or self.expert_shapes):
            config = quantization_config(self.model, self.shapes, experts=self.expert_shapes)
            write_quantization_config(self.model, config, self.tmp)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self.tmp)
        write_manifest(self.tmp)


def _metadata(qweight: QuantizedWeight) -> QuantizedWeight:
    """``qweight`` with codes, scales and zero points on the meta device: their shapes and the scheme are all the
    ``quantization_config`` needs, and real scales would add up over a large model (2.75 MB per layer of a 1B Llama
    at group size 64). ``g_idx`` stays: it is small and its values are checked."""

    def meta(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta")

    return dataclasses.replace(
        qweight, codes=meta(qweight.codes), scale=meta(qweight.scale), zero_point=meta(qweight.zero_point)
    )
