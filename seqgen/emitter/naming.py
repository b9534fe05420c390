"""Names for the values of a traced graph, taken from the model's own source.

One name per value, valid in every generated file and used as the key of the intermediates cache. A value takes the
local variable name it was first bound to in model code (``hidden_states``); otherwise a name derived from its op.
As in the source, a name is *reused* once its previous value is dead: ``hidden_states = model.model.layers[3](
hidden_states, ...)`` rebinds it, and a suffix (``hidden_states_1``) appears only where two live values would clash.
Liveness follows execution order (subgraph by subgraph), so at every subgraph boundary the live values, which are the
cache's keys, have distinct names.
"""

from __future__ import annotations

import builtins
import keyword
import re

from torch.fx.node import Node

from ..partition import Partition, is_inline

__all__ = ["assign_names", "RESERVED"]

RESERVED = frozenset(
    set(keyword.kwlist)
    | set(dir(builtins))
    | {"model", "torch", "guard", "Any", "forward", "INPUTS", "OUTPUTS", "CONSUMED", "TARGETS"}
)


def _identifier(text: str) -> str:
    name = re.sub(r"\W+", "_", text).strip("_").lower() or "value"
    if name[0].isdigit():
        name = "v_" + name
    return name


def _base_name(node: Node, names: dict[Node, str]) -> str:
    source = node.meta.get("seqgen_source_name")
    if source:
        return _identifier(source)
    if node.op == "placeholder":
        return str(node.target)
    if node.op == "call_module":
        parts = str(node.target).split(".")
        return _identifier("_".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    if node.op == "call_method":
        return _identifier(str(node.target))
    target = node.target
    if target is getattr:
        return _identifier(str(node.args[1]))
    fn_name = getattr(target, "__name__", "value")
    if isinstance(target, type):  # an instance of a leaf class: DynamicCache -> dynamic_cache
        fn_name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", fn_name)
    if fn_name == "getitem" and isinstance(node.args[0], Node) and isinstance(node.args[1], int):
        parent = names.get(node.args[0]) or _base_name(node.args[0], names)
        index = node.args[1]
        return f"{parent}_{index}" if index >= 0 else f"{parent}_last" if index == -1 else f"{parent}_m{-index}"
    if fn_name == "getitem" and isinstance(node.args[0], Node) and isinstance(node.args[1], str):
        parent = names.get(node.args[0]) or _base_name(node.args[0], names)
        return _identifier(f"{parent}_{node.args[1]}")
    return _identifier(fn_name)


def assign_names(
    partitions: list[Partition], placeholders: list[Node], output: Node, taken: set[str]
) -> dict[Node, str]:
    """Map every value node to its name. ``taken`` holds names the files import (never used for values)."""
    order = [n for part in partitions for n in part.nodes if not is_inline(n)]
    position: dict[Node, int] = {}
    for i, node in enumerate(order):
        position.setdefault(node, i)  # a node built in several subgraphs holds its name from the first
    end = len(order) + 1
    last_use: dict[Node, int] = {}
    for node in order:
        for source in _value_inputs(node):
            last_use[source] = max(last_use.get(source, -1), position[node])
    for source in _value_inputs(output):
        last_use[source] = end

    for key, value in _output_keys(output).items():
        value.meta.setdefault("seqgen_source_name", key)

    names: dict[Node, str] = {}
    holder: dict[str, Node] = {}
    for node in placeholders:
        names[node] = str(node.target)
        holder[names[node]] = node
    for node in order:
        if _is_statement_only(node) or node in names:  # a node built in several subgraphs is named once
            continue
        base = _base_name(node, names)
        if base in RESERVED or base in taken:
            base = base + "_"
        here = position[node]
        candidate, suffix = base, 0
        while True:
            previous = holder.get(candidate)
            if previous is None or last_use.get(previous, -1) <= here:
                break
            suffix += 1
            candidate = f"{base}_{suffix}"
        names[node] = candidate
        holder[candidate] = node
    return names


def _is_statement_only(node: Node) -> bool:
    """Guards and other calls whose result nothing reads are written as bare statements."""
    return not node.users


def _value_inputs(node: Node) -> list[Node]:
    found: list[Node] = []
    for source in node.all_input_nodes:
        if is_inline(source):
            found.extend(_value_inputs(source))
        else:
            found.append(source)
    return found


def _output_keys(output: Node) -> dict[str, Node]:
    value = output.args[0]
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(v, Node)}
    return {}
