"""Where model code is running: the frames of the model's own source, told apart from torch, transformers' plumbing,
the standard library and seqgen. Locations, source lines and error sites of the tracer come from here."""

from __future__ import annotations

import dis
import inspect
import linecache
import os
import sysconfig
import traceback
from types import FrameType
from typing import Any

import torch

__all__ = ["first_line", "in_assertion", "innermost_model_frame", "is_model_code", "frame_location", "model_frame_of"]
__all__ += ["model_line", "short_where"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_SEQGEN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
_SKIP_DIRS: tuple[str, ...] = (_TORCH_DIR, _SEQGEN_DIR, _STDLIB_DIR)
try:
    import transformers

    _TRANSFORMERS_DIR = os.path.dirname(transformers.__file__) + os.sep
    # decorators and hooks: their frames are plumbing, not model code
    _SKIP_DIRS += (_TRANSFORMERS_DIR + "utils" + os.sep, _TRANSFORMERS_DIR + "integrations" + os.sep)
except ImportError:  # pragma: no cover - transformers is a dependency
    _TRANSFORMERS_DIR = ""


def is_model_code(filename: str) -> bool:
    return not filename.startswith(_SKIP_DIRS) and not filename.startswith("<")


def frame_location(frame: Any) -> tuple[str, int, str]:
    """``(filename, line, qualified function name)`` of a frame."""
    code = frame.f_code
    return code.co_filename, frame.f_lineno, getattr(code, "co_qualname", code.co_name)


def short_where(loc: tuple[str, int, str] | None) -> str:
    if loc is None:
        return "<unknown>"
    return f"{os.path.basename(loc[0])}:{loc[1]}"


def innermost_model_frame() -> FrameType | None:
    """The innermost frame of the current stack that runs model code, or None."""
    frame = inspect.currentframe()
    while frame is not None and not is_model_code(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def model_line() -> tuple[tuple[str, int, str] | None, str]:
    """The location of the innermost model-code frame and its source line, stripped (``None, ""`` if none)."""
    frame = innermost_model_frame()
    if frame is None:
        return None, ""
    loc = frame_location(frame)
    return loc, linecache.getline(loc[0], loc[1]).strip()


def in_assertion() -> bool:
    """Whether the innermost model-code frame is evaluating the condition of an ``assert`` statement."""
    frame = innermost_model_frame()
    if frame is None:
        return False
    instructions = list(dis.get_instructions(frame.f_code))
    for i, instruction in enumerate(instructions[:-1]):
        if instruction.offset == frame.f_lasti:
            return "IF_TRUE" in instruction.opname and instructions[i + 1].opname == "LOAD_ASSERTION_ERROR"
    return False


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def model_frame_of(exc: BaseException) -> str:
    """' in Class.method (file:line: `code`)' for the innermost model-code frame of a traceback, or ''."""
    found = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if is_model_code(filename):
            qualname = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
            code = linecache.getline(filename, lineno).strip()
            found = f" in {qualname} ({os.path.basename(filename)}:{lineno}: `{code}`)"
    return found
