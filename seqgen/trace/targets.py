"""Which modules are sequential targets (one calibration step each).

The rules, in order, and the log line that says which one was used:

1. ``--targets``: each entry is a module class name, or a regular expression matched in full against module names
   (``model.layers.\\d+``).
2. The model's ``_no_split_modules`` classes present in it that are items of an ``nn.ModuleList`` (so an embedding
   module listed there, as bert's is, is not a target).
3. The repeated blocks of the longest ``nn.ModuleList`` of same-class modules (models without ``_no_split_modules``:
   gpt1, ctrl, git, ...; or whose ``_no_split_modules`` name only parts of a block: roberta-prelayernorm). Where
   sibling lists of the same length hold the parts of each block (xlm: ``attentions``, ``ffns``, ...), block i is
   the i-th item of each, and its parts share one subgraph.
4. Whatever ``_no_split_modules`` classes the model has.

Rules 2 to 4 only look at the text decoder: inside ``get_decoder()`` when the model has one, and never inside a
vision or audio tower (a sub-model whose config is neither the model's nor its text config), so those towers run in
the head subgraph. Nested matches keep only the outermost module. Finding no target is an error, never a silent single
subgraph.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch

from ..errors import TraceFailure

__all__ = ["find_targets", "find_target_units", "tower_targets"]

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
    is_stack = isinstance(decoder, torch.nn.Module) and any(
        isinstance(m, torch.nn.ModuleList) for m in decoder.modules()
    )
    if not is_stack:
        return ""  # not a stack of layers (modernbert-decoder's get_decoder() is its output projection)
    for name, module in model.named_modules():
        if module is decoder:
            return name
    return ""


def _within(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + ".")


def _towers(model: torch.nn.Module) -> list[str]:
    """Module names of sub-models that are not the text decoder: their config is neither the model's nor its text's."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    own = {id(config)}
    get_text_config = getattr(config, "get_text_config", None)
    if get_text_config is not None:
        try:
            own.add(id(get_text_config()))
        except Exception:  # ambiguous text configs (several decoders): keep only the model's own
            pass
    towers = []
    for name, module in model.named_modules():
        sub = module.__dict__.get("config")
        if name and sub is not None and hasattr(sub, "to_dict") and id(sub) not in own:
            towers.append(name)
    return _outermost(towers)


def _in_text_decoder(path: str, prefix: str, towers: list[str]) -> bool:
    return _within(path, prefix) and not any(_within(path, t) for t in towers)


def _list_items(model: torch.nn.Module) -> set[str]:
    items = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            items.update(f"{name}.{i}" if name else str(i) for i in range(len(module)))
    return items


def _block_lists(model: torch.nn.Module, prefix: str, towers: list[str]) -> list[tuple[str, int]]:
    """(name, length) of the text decoder's module lists of same-class modules, in module order."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not _in_text_decoder(name, prefix, towers) or len(module) < 1:
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1 and not isinstance(module[0], torch.nn.ModuleList):
            found.append((name, len(module)))
    return found


def _repeated_blocks(model: torch.nn.Module, prefix: str, towers: list[str]) -> list[list[str]]:
    """The longest list's items, one unit each; where sibling lists of the same length hold the parts of each block
    (xlm: ``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2``), the i-th items of all of them form unit i."""
    lists = _block_lists(model, prefix, towers)
    if not lists:
        return []
    best, length = max(lists, key=lambda item: item[1])  # the first of the longest
    parent = best.rpartition(".")[0]
    parallel = [n for n, size in lists if size == length and n.rpartition(".")[0] == parent]
    return [[f"{n}.{i}" if n else str(i) for n in parallel] for i in range(length)]


def find_targets(model: torch.nn.Module, targets: Sequence[str] | None = None) -> list[str]:
    """Return the module names of the sequential targets, in module order."""
    return [name for unit in find_target_units(model, targets) for name in unit]


def find_target_units(model: torch.nn.Module, targets: Sequence[str] | None = None) -> list[list[str]]:
    """The sequential targets in units that share a subgraph: one module each, or the parts of one block that sit in
    parallel module lists (see :func:`_repeated_blocks`)."""
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
        return [[name] for name in chosen]

    prefix = _decoder_prefix(model)
    towers = _towers(model)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    matched = [
        n for n, m in modules.items() if n and type(m).__name__ in no_split and _in_text_decoder(n, prefix, towers)
    ]
    chosen = _outermost([n for n in matched if n in _list_items(model)])
    if chosen:
        logger.info("targets: %d modules of _no_split_modules %s", len(chosen), sorted(no_split))
        return [[name] for name in chosen]
    units = _repeated_blocks(model, prefix, towers)
    if units:
        logger.info(
            "targets: %d repeated blocks of %s (the model's _no_split_modules name no repeated block)",
            len(units),
            ", ".join(type(modules[name]).__name__ for name in units[0]),
        )
        return units
    chosen = _outermost(matched)
    if chosen:
        logger.info("targets: %d modules of _no_split_modules %s", len(chosen), sorted(no_split))
        return [[name] for name in chosen]
    raise TraceFailure(
        f"{type(model).__name__}: found no sequential targets: it has no _no_split_modules and no list of "
        "repeated blocks. Pass --targets with the decoder layer class name or a module-name regex."
    )


def tower_targets(model: torch.nn.Module) -> list[str]:
    """The model's vision or audio towers, in module order: targets to add to the text decoder's when the towers'
    linears are to be calibrated too. Each tower is one target, called as a whole: towers compute positions and
    windows from their inputs' values (image grid sizes), which a trace on the meta device cannot follow."""
    return _towers(model)
