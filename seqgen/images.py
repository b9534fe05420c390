"""Calibration data with images, for vision-language models.

A ``.jsonl`` file of chats whose messages hold images: each line is ``{"messages": [...]}`` in transformers' chat
format, where a message's ``content`` is a list of parts such as ``{"type": "image", "path": "cat.png"}`` and
``{"type": "text", "text": "What is this?"}``. Relative image paths are relative to the ``.jsonl`` file. The model's
processor renders each chat as its chat template expects (image placeholders, pixel values, grid sizes), so each
chat is one sample, used whole: ``--seq-len`` does not cut it, because a cut could fall inside an image's tokens.

A package for such data is traced with the first sample's inputs (:func:`emit_options`): its vision tower and
projector then sit in the package's code, and their linears stay unquantized unless the towers are added to the
targets (:func:`seqgen.trace.targets.tower_targets`: each tower one subgraph, quantized in one step).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import read_jsonl
from .errors import SeqgenError
from .index import InputSpec

__all__ = ["ImageChats", "has_images", "load_image_chats", "load_processor", "image_batches", "emit_options"]

logger = logging.getLogger(__name__)

_ACCEPTED = "a .jsonl file of chats, one {'messages': [...]} object a line"


def _parts(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The content parts of a record's messages (string contents have none)."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        return []
    return [
        part
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict)
    ]


def has_images(dataset: str | Path | None) -> bool:
    """Whether ``dataset`` is a local ``.jsonl`` file with at least one image part in its chats."""
    if dataset is None or Path(dataset).suffix.lower() != ".jsonl" or not Path(dataset).is_file():
        return False
    return any(
        part.get("type") == "image" for _, record in read_jsonl(Path(dataset), _ACCEPTED) for part in _parts(record)
    )


@dataclass(frozen=True)
class ImageChats:
    path: Path
    chats: list[list[dict[str, Any]]]  # each chat's messages, image paths made absolute

    @property
    def images(self) -> int:
        return sum(1 for chat in self.chats for part in _parts({"messages": chat}) if part.get("type") == "image")


def load_image_chats(path: str | Path) -> ImageChats:
    """The chats of ``path``; a record without ``messages``, or an image part whose file is missing, is refused with
    its line."""
    path = Path(path)
    chats = []
    for where, record in read_jsonl(path, _ACCEPTED):
        if not isinstance(record.get("messages"), list):
            raise SeqgenError(f"{where} has no 'messages' list (fields: {sorted(record)}); each line is one chat.")
        for part in _parts(record):
            if part.get("type") != "image":
                continue
            source = part.get("path") or part.get("image") or part.get("url")
            if not isinstance(source, str) or re.match(r"^[a-z]+://", source):
                raise SeqgenError(
                    f"{where}: an image part names no local file ({part}); give it a 'path' to an image file."
                )
            image = (path.parent / source).resolve()
            if not image.is_file():
                raise SeqgenError(f"{where}: image {image} does not exist; fix the path (relative to {path.parent}).")
            for key in ("image", "url"):
                part.pop(key, None)
            part["path"] = str(image)
        chats.append(record["messages"])
    if not chats:
        raise SeqgenError(f"{path} holds no chat. Pass {_ACCEPTED}.")
    return ImageChats(path, chats)


def load_processor(directory: Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's processor (image processor, tokenizer and chat template together)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise SeqgenError(
            f"{directory} has no usable processor for image data ({exc}). Save the model's processor with it "
            "(processor.save_pretrained), or calibrate on text."
        ) from exc
    if not hasattr(processor, "image_processor"):
        raise SeqgenError(
            f"{directory}'s processor ({type(processor).__name__}) takes no images, so the image data cannot be "
            "rendered for it. Calibrate this model on text."
        )
    return processor


def image_batches(data: ImageChats, processor: Any, num_samples: int) -> list[dict[str, torch.Tensor]]:
    """The first ``num_samples`` chats, each rendered by ``processor`` as one batch of one sample."""
    if len(data.chats) < num_samples:
        logger.warning(
            "%s holds %d chats, fewer than the %d samples asked for: using all", data.path, len(data.chats), num_samples
        )
    batches = []
    for chat in data.chats[:num_samples]:
        rendered = processor.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
        batches.append({name: value for name, value in rendered.items() if isinstance(value, torch.Tensor)})
    return batches


# Methods that scan the token ids for image spans (multimodal rotary positions): the generated code calls them on every
# batch, as eager mode does, instead of freezing the trace sample's spans into the code.
_SPAN_SCANNERS = ("get_rope_index",)


def emit_options(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], targets: list[str] | None = None
) -> Any:
    """Emit options for a package of ``model`` that runs ``batches``: traced with the first one's shapes and extra
    inputs; ``targets`` (module names) replace the default targets."""
    from .emitter import EmitOptions

    sample = batches[0]
    extra = tuple(
        InputSpec(name, str(value.dtype).removeprefix("torch."), tuple(value.shape))
        for name, value in sample.items()
        if name not in ("input_ids", "attention_mask")
    )
    scanners = sorted(
        {
            f"{type(module).__name__}.{method}"
            for module in model.modules()
            for method in _SPAN_SCANNERS
            if method in type(module).__dict__
        }
    )
    return EmitOptions(
        targets=tuple(re.escape(name) for name in targets) if targets else None,
        ignore=tuple(scanners),
        sample_shape=tuple(sample["input_ids"].shape),
        extra_inputs=extra,
    )
