"""Which modules are sequential targets (one calibration step each).

The rules, in order, and the log line that says which one was used:

1. ``--targets``: each entry is a module class name, or a regular expression matched in full against module names
   (``model.layers.\\d+``).
2. The model's ``_no_split_modules`` classes present in it, restricted to the text decoder (``get_decoder()``) when
   the model has one, so vision towers run in the head subgraph.
3. The repeated blocks of the decoder's longest ``nn.ModuleList`` of same-class modules (models without
   ``_no_split_modules``: gpt1, ctrl, xlnet, ...).

Nested matches keep only the outermost module. Finding no target is an error, never a silent single subgraph.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch

from ..errors import TraceFailure

__all__ = ["find_targets"]

logger = logging.getLogger(__name__)


def _outermost(paths: list[str]) -> list[str]:
    kept: list[str] = []
    for path in paths:
        if not any(path.startswith(k + ".") for k in kept):
            kept.append(path)
    return kept


def _decoder_prefix(model: torch.nn.Module) -> str:
    get_decoder = getattr(model, "get_decoder", None)
    if get_decoder is None:
        return ""
    try:
        decoder = get_decoder()
    except Exception:  # some models raise for missing attributes; then the whole model is the decoder
        return ""
    for name, module in model.named_modules():
        if module is decoder:
            return name
    return ""


def _within(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")


def _repeated_blocks(model: torch.nn.Module, prefix: str) -> list[str]:
    best: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not _within(name, prefix) or len(module) < 1:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or isinstance(module[0], torch.nn.ModuleList):
            continue
        if len(module) > len(best):
            best = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return best


def find_targets(model: torch.nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """Return the module names of the sequential targets, in module order."""
    modules = dict(model.named_modules())
    if targets:
        chosen = []
        for name, module in modules.items():
            for spec in targets:
                if type(module).__name__ == spec or (name and re.fullmatch(spec, name)):
                    chosen.append(name)
                    break
        chosen = _outermost(chosen)
        if not chosen:
            raise TraceFailure(
                f"--targets {list(targets)!r} matched no module of {type(model).__name__}. Give class names "
                f"(e.g. {type(next(iter(model.children()), model)).__name__!r}) or regular expressions over module "
                "names (e.g. 'model.layers.\\d+')."
            )
        logger.info("targets: %d modules matched by --targets", len(chosen))
        return chosen

    prefix = _decoder_prefix(model)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    if no_split:
        chosen = _outermost(
            [n for n, m in modules.items() if n and type(m).__name__ in no_split and _within(n, prefix)]
        )
        if chosen:
            logger.info("targets: %d modules of _no_split_modules %s", len(chosen), sorted(no_split))
            return chosen
    chosen = _repeated_blocks(model, prefix)
    if chosen:
        logger.info(
            "targets: %d repeated %s blocks (the model declares no usable _no_split_modules)",
            len(chosen),
            type(modules[chosen[0]]).__name__,
        )
        return chosen
    raise TraceFailure(
        f"{type(model).__name__}: found no sequential targets: it has no _no_split_modules and no list of "
        "repeated blocks. Pass --targets with the decoder layer class name or a module-name regex."
    )
