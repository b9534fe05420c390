"""Reading a checkpoint: the tensors of a safetensors checkpoint directory by the model's names, read lazily.

Disk offload reads each subgraph's weights from here when it runs. Checkpoint names and layouts that differ from the
model's (fused MoE experts stored one linear per expert, or transposed; renamed modules; rows split over several
tensors; tied weights stored once) are found through transformers' own save-time weight conversion.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from ..errors import SeqgenError
from ..runtime.experts import EXPERT_PARAMS, UNGATED_PARAMS, is_fused_experts, is_transposed_experts
from .layout import checkpoint_layout
from .validate import check_checkpoint_files

__all__ = ["Piece", "SafetensorsWeights"]

logger = logging.getLogger(__name__)


class Piece(NamedTuple):
    """One checkpoint tensor that makes up (part of) a model tensor stored under other names."""

    key: str  # the checkpoint's name
    expert: int | None  # the expert whose rows ``rows`` it fills; None: rows of the whole model tensor
    rows: torch.Tensor | None  # None: the whole model tensor (a rename, or a tie)
    # the whole tensor with its last two dimensions swapped (Qwen3-VL-MoE's experts are stored [E, in, out])
    transposed: bool = False


class SafetensorsWeights:
    """Tensors of a checkpoint directory by name, read lazily from its (memory-mapped) safetensors files.

    Names are the model's. Given the ``model`` (a skeleton on meta is enough), tensors that the checkpoint stores
    under other names are found through transformers' own save-time weight conversion, the inverse of what
    ``from_pretrained`` does while loading: renamed modules (Mixtral's ``block_sparse_moe`` is the model's ``mlp``)
    and fused MoE experts, assembled from one 2-D weight per expert (``experts.<e>.w1/w2/w3.weight``).
    """

    def __init__(self, directory: str | Path, model: torch.nn.Module | None = None) -> None:
        directory = Path(directory)
        check_checkpoint_files(directory)
        index_file = directory / "model.safetensors.index.json"
        if index_file.exists():
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        elif (directory / "model.safetensors").exists():
            with safe_open(directory / "model.safetensors", "pt") as f:
                weight_map = {name: "model.safetensors" for name in f.keys()}
        else:
            raise SeqgenError(f"{directory} has no safetensors checkpoint (model.safetensors or its index).")
        self.directory = directory
        self.weight_map = weight_map
        # model tensor name -> the checkpoint tensors it is read from, when it is not stored under its own name
        self.sources: dict[str, list[Piece]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._headers: dict[str, dict[str, dict]] = {}  # file -> its safetensors header, when read
        self.unreadable: dict[str, str] = {}  # model tensor name -> why disk offload cannot read it (see check)
        if model is not None:
            self._find_converted(model)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map or name in self.sources

    def checkpoint_keys(self, name: str) -> list[str]:
        """The checkpoint tensors that model tensor ``name`` is read from."""
        return [piece.key for piece in self.sources[name]] if name in self.sources else [name]

    def _find_converted(self, model: torch.nn.Module) -> None:
        missing = {name: t for name, t in model.state_dict(keep_vars=True).items() if name not in self.weight_map}
        params = set(EXPERT_PARAMS + UNGATED_PARAMS)
        owners = {name.rpartition(".")[0] for name in missing if name.rpartition(".")[2] in params}
        # (Llama 4's transposed experts are read only as stored, fused: rows of a per-expert split are [out, in])
        for owner in sorted(
            o
            for o in owners
            if is_fused_experts(model.get_submodule(o)) and not is_transposed_experts(model.get_submodule(o))
        ):
            layout = checkpoint_layout(model, owner) or {}
            if layout and all(key in self.weight_map for key in layout):
                for key, (param, expert, rows) in layout.items():
                    self.sources.setdefault(param, []).append(Piece(key, expert, rows))
                    self._shapes[param] = tuple(missing[param].shape)
        tied: dict[int, str] = {}  # parameter object -> a name of it that the checkpoint holds
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in self.weight_map:
                tied.setdefault(id(param), name)
        for name, param in model.named_parameters(remove_duplicate=False):  # tied weights stored under one name
            if name in missing and id(param) in tied and name not in self.sources:
                self.sources[name] = [Piece(tied[id(param)], None, None)]
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in self.sources:
                continue
            pieces = self._row_pieces(model, name, tuple(tensor.shape))
            if pieces == "converted":
                self.unreadable[name] = (
                    f"{name} is stored in {self.directory} in a layout that transformers converts while loading (an "
                    "interleave, a reshape: more than a rename, a split of rows or a transpose), which disk offload "
                    "does not reproduce."
                )
            elif pieces is None:
                logger.debug("%s: not in the checkpoint under any name", name)
            elif len(pieces) > 1 or pieces[0].key != name or pieces[0].rows is not None or pieces[0].transposed:
                self.sources[name] = pieces
                if pieces[0].rows is not None or pieces[0].transposed:
                    self._shapes[name] = tuple(tensor.shape)
        self._check_shapes(model)
        if self.sources:
            logger.info(
                "%d model tensors are read from checkpoint tensors of other names (e.g. %s <- %s)",
                len(self.sources),
                next(iter(self.sources)),
                self.checkpoint_keys(next(iter(self.sources)))[0],
            )

    def _check_shapes(self, model: torch.nn.Module) -> None:
        """Every checkpoint tensor a model tensor is read from has the shape that reading assumes. The conversion
        probe sends one model tensor at a time, so a checkpoint tensor that transformers gathers from several
        (Ernie 4.5 VL's text and vision router biases, stored as one [2, E]) would look like a rename of each."""
        for name, tensor in model.state_dict(keep_vars=True).items():
            shape = tuple(tensor.shape)
            for piece in self.sources.get(name, [Piece(name, None, None)] if name in self.weight_map else []):
                if piece.rows is None:
                    expected = [shape, (*shape[:-2], shape[-1], shape[-2])] if piece.transposed else [shape]
                else:
                    expected = [(len(piece.rows), *shape[1 if piece.expert is None else 2 :])]
                stored = self.stored_shape(piece.key)
                if stored not in expected and name not in self.unreadable:
                    self.unreadable[name] = (
                        f"{name} {list(shape)} is read from {piece.key}, stored as {list(stored)} in "
                        f"{self.directory}: transformers builds it from more than that tensor while loading (a "
                        "tensor shared by several modules, or reshaped), which disk offload does not reproduce."
                    )

    def check(self, names: Iterable[str]) -> None:
        """Raise if a model tensor of ``names`` cannot be read as ``from_pretrained`` would load it. Such tensors
        are found when the checkpoint is opened, but are only an error for a calibration that reads them (a vision
        tower that text calibration never runs may hold some)."""
        for name in names:
            if name in self.unreadable:
                raise SeqgenError(f"{self.unreadable[name]} Calibrate with the weights in memory (--offload memory).")

    def _row_pieces(self, model: torch.nn.Module, name: str, shape: tuple[int, ...]) -> list[Piece] | str | None:
        """Where the checkpoint keeps model tensor ``name``, as pieces made of whole rows of it (a rename is one
        piece of all rows; a fused q/k/v convolution stored as three is three), found by sending a probe through
        transformers' save-time conversion (what ``save_pretrained`` runs): every element is tagged with its position,
        and the trailing dimensions get distinct small sizes, so a transpose, an interleave or a reshape shows. None
        when the checkpoint lacks what the conversion names; ``"converted"`` when it holds it, converted otherwise."""
        from transformers.core_model_loading import revert_weight_conversion

        if not shape:
            return [Piece(name, None, None)] if name in self.weight_map else None
        # distinct, and divisible by 2, 3 and 4 where it matters most (dim 1): chunks and interleaves still apply
        rows, trailing = shape[0], (12, 8, 6, 4, 2)[: len(shape) - 1]
        width = math.prod(trailing)
        probe = torch.arange(rows * width).reshape((rows,) + trailing)  # every element tagged with its position
        try:
            reverted = revert_weight_conversion(model, {name: probe})
        except Exception:  # noqa: BLE001 - a converter that needs the real sizes: not a row split
            return "converted"
        if not reverted or any(key not in self.weight_map for key in reverted):
            return None
        if len(reverted) == 1 and probe.dim() > 1 and torch.equal(next(iter(reverted.values())), probe.mT):
            return [Piece(next(iter(reverted)), None, None, self._swaps_square(model, name, shape))]
        pieces: list[Piece] = []
        seen = torch.zeros(rows, dtype=torch.long)
        for key, tags in sorted(reverted.items()):
            if tuple(tags.shape[1:]) != trailing:
                return "converted"
            flat = tags.reshape(tags.shape[0], width)
            index = flat[:, 0] // width
            if (
                int(flat.min()) < 0
                or int(flat.max()) >= rows * width
                or not torch.equal(flat, probe.reshape(rows, width)[index])
            ):
                return "converted"  # rows were not kept whole and in order
            seen[index] += 1
            pieces.append(Piece(key, None, index.clone()))
        if not bool((seen == 1).all()):
            return "converted"
        if len(pieces) == 1 and torch.equal(pieces[0].rows, torch.arange(rows)):
            return [Piece(pieces[0].key, None, None)]  # the whole tensor, renamed or not
        return pieces

    @staticmethod
    def _swaps_square(model: torch.nn.Module, name: str, shape: tuple[int, ...]) -> bool:
        """Whether a tensor stored transposed is transposed when its last two dimensions are equal too: converters
        that compare the stored shape with the model's (``Transpose(check_dims=True)``) leave such a tensor as it is."""
        from transformers.core_model_loading import revert_weight_conversion

        if shape[-1] != shape[-2]:
            return True
        square = (shape[0], shape[0]) if len(shape) == 2 else (shape[0], *(12, 8, 6, 4)[: len(shape) - 3], 8, 8)
        probe = torch.arange(math.prod(square)).reshape(square)
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr not in owner._parameters:
            return True
        # such a converter reads the model's own shape: for the probe, it is the probe's (meta: no memory)
        real = owner._parameters[attr]
        owner._parameters[attr] = torch.nn.Parameter(torch.empty(square, device="meta"), requires_grad=False)
        try:
            reverted = next(iter(revert_weight_conversion(model, {name: probe}).values()))
        finally:
            owner._parameters[attr] = real
        return torch.equal(reverted, probe.mT)

    @staticmethod
    def _as_model_stores(piece: Piece, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A checkpoint tensor in the model's layout: swapped back if it is stored transposed (a tensor already in
        the model's non-square shape is taken as it is, as transformers' shape-checking converter does)."""
        if piece.transposed and (shape[-1] == shape[-2] or tuple(tensor.shape) != shape):
            return tensor.transpose(-2, -1).contiguous()
        return tensor

    def _header(self, file: str) -> dict[str, dict]:
        """The safetensors header of ``file``: key -> dtype, shape and data offsets (read once)."""
        if file not in self._headers:
            with open(self.directory / file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for info in header.values():
                info["data_offsets"] = [8 + size + offset for offset in info["data_offsets"]]
            self._headers[file] = header
        return self._headers[file]

    def byte_ranges(self, file: str) -> dict[str, tuple[int, int]]:
        """Where each tensor of ``file`` lies in it: key -> (byte offset, length), from the safetensors header."""
        return {
            key: (info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
            for key, info in self._header(file).items()
        }

    def stored_shape(self, key: str) -> tuple[int, ...]:
        """The shape of checkpoint tensor ``key``, from its file's header."""
        return tuple(self._header(self.weight_map[key])[key]["shape"])

    def prefetch(self, names: Iterable[str]) -> None:
        """Ask the kernel to start reading the tensors ``names`` into the page cache (no-op where ``posix_fadvise``
        does not exist). Returns at once; a later :meth:`read` of them then finds their pages in memory."""
        if not hasattr(os, "posix_fadvise"):
            return
        by_file: dict[str, list[str]] = {}
        for name in names:
            for key in self.checkpoint_keys(name):
                by_file.setdefault(self.weight_map[key], []).append(key)
        for file, keys in sorted(by_file.items()):
            header = self._header(file)
            fd = os.open(self.directory / file, os.O_RDONLY)
            try:
                for key in keys:
                    start, end = header[key]["data_offsets"]
                    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read(self, names: Iterable[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors ``names`` on ``device``; fused experts are assembled one expert weight at a time."""
        names = list(names)
        by_file: dict[str, list[str]] = {}
        for name in names:
            for key in self.checkpoint_keys(name):
                by_file.setdefault(self.weight_map[key], []).append(key)
        parts: dict[str, tuple[int | None, torch.Tensor]] = {}  # piece key -> (expert or None, rows to copy it into)
        target: dict[str, str] = {}
        for name in names:
            for piece in self.sources.get(name, []):
                if piece.rows is not None:
                    parts[piece.key] = (piece.expert, piece.rows)
                    target[piece.key] = name
        found: dict[str, torch.Tensor] = {}
        for file, keys in sorted(by_file.items()):
            with safe_open(self.directory / file, "pt", device=str(device)) as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    if key not in parts:
                        found[key] = tensor
                        continue
                    name = target[key]
                    if name not in found:
                        found[name] = torch.empty(self._shapes[name], dtype=tensor.dtype, device=device)
                    expert, rows = parts[key]
                    whole = found[name] if expert is None else found[name][expert]
                    whole.index_copy_(0, rows.to(device), tensor)
        result: dict[str, torch.Tensor] = {}
        for name in names:
            pieces = self.sources.get(name, [])
            renamed = bool(pieces) and pieces[0].rows is None  # (or tied to a tensor stored under another name)
            if renamed and pieces[0].transposed:
                result[name] = self._as_model_stores(pieces[0], found[pieces[0].key], self._shapes[name])
            else:
                result[name] = found[pieces[0].key] if renamed else found[name]
        return result
