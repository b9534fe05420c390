"""A checkpoint's safetensors files checked before anything loads them: each one there, whole, with a readable header.

Only the headers are read (a few KB per file), so a 70B checkpoint is checked in milliseconds. A download cut short
is caught here with the file named, rather than as a safetensors error from inside ``from_pretrained`` or, with disk
offload, hours into a calibration when its subgraph comes. Bytes flipped inside the tensor data are not detected:
safetensors files carry no checksum.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import BadInput, MissingInput

__all__ = ["check_checkpoint_files"]

_INDEX = "model.safetensors.index.json"
_FIX = "Download or copy the checkpoint again."


def check_checkpoint_files(directory: str | Path) -> None:
    """Raise :class:`MissingInput` for a shard that the index lists and that is missing, :class:`BadInput` for an
    index or a safetensors file that is truncated or not safetensors. A checkpoint without safetensors files (``.bin``
    only) is left to transformers."""
    directory = Path(directory)
    index = directory / _INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadInput(f"{index} is not a safetensors index ({_reason(exc)}). {_FIX}") from None
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise MissingInput(f"{directory} lacks {', '.join(missing)}, which its {_INDEX} lists. {_FIX}")
    else:
        files = sorted(path.name for path in directory.glob("*.safetensors"))
    for name in files:
        _check_file(directory / name)


def _check_file(path: Path) -> None:
    """The header parses and the tensors it places fit in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInput(f"{path} is truncated: {size} bytes, too few for a safetensors header. {_FIX}")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise BadInput(
                f"{path} is truncated or not a safetensors file: its header claims {length} bytes, the file has "
                f"{size}. {_FIX}"
            )
        try:
            header = json.loads(f.read(length).decode("utf-8"))
            end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise BadInput(f"{path} is not safetensors: its header is unreadable ({_reason(exc)}). {_FIX}") from None
    if 8 + length + end > size:
        raise BadInput(f"{path} is truncated: its tensors need {8 + length + end} bytes, it has {size}. {_FIX}")


def _reason(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
