"""Split a traced graph into one subgraph per group of sequential targets.

Placement rule: a target node goes to its group's subgraph (groups are numbered from 1). Every other node goes to the
earliest subgraph where all its inputs exist, where reading the output of a group's *last* target counts as being
after that group. So the head subgraph (0) holds the embeddings, masks and rotary tables, whatever reads a layer's
output lands with the next layer, and the final norm and ``lm_head`` form the tail. Nodes written inline (attribute
reads such as ``x.shape[1]``) go with their single user, and a fresh leaf instance (an empty KV cache, see
:data:`seqgen.trace.leaves.LEAF_CLASSES`) or a small constant tensor made in forward (a ``torch.tensor(...)``
literal) is built in each subgraph that uses it. Empty subgraphs are dropped.

For each subgraph the partitioner lists the values it reads from earlier ones (inputs), the values later ones or the
caller read (outputs), and the inputs that nothing later reads (consumed: the runtime frees them).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.node import Node

from .errors import TraceFailure
from .trace.passes import SUBEXPRESSION
from .trace.tracer import ROOT_NAME

__all__ = ["Partition", "partition_graph", "is_inline"]


@dataclass
class Partition:
    index: int
    nodes: list[Node] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # module names relative to the model
    inputs: list[Node] = field(default_factory=list)
    outputs: list[Node] = field(default_factory=list)
    consumed: list[Node] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # submodules it calls (relative to the model)
    tensors: list[str] = field(default_factory=list)  # parameters and buffers it reads directly


def is_inline(node: Node) -> bool:
    """Nodes rendered inside their single user's expression: attribute reads, constant indexing of them, and the
    unnamed parts of one source expression (see :func:`seqgen.trace.passes.mark_subexpressions`)."""
    if node.op == "get_attr":
        return True
    if node.meta.get(SUBEXPRESSION) and len(node.users) == 1:
        return True
    if node.op != "call_function" or len(node.users) != 1:
        return False
    if node.target is getattr:
        return True
    return node.target is operator.getitem and isinstance(node.args[1], int) and is_inline_source(node.args[0])


def is_inline_source(value: object) -> bool:
    return isinstance(value, Node) and is_inline(value)


def _module_name(target: str) -> str:
    return target[len(ROOT_NAME) + 1 :] if target.startswith(ROOT_NAME + ".") else ""


def partition_graph(
    graph: torch.fx.Graph,
    root: torch.nn.Module,
    targets: list[str],
    targets_per_subgraph: int = 1,
    units: list[list[str]] | None = None,
) -> list[Partition]:
    """``units``: the targets in blocks that always share a subgraph (the i-th items of parallel module lists, as
    xlm's ``attentions``, ``ffns``, ...); by default each target alone. ``targets_per_subgraph`` counts units."""
    if targets_per_subgraph < 1:
        raise TraceFailure(f"--targets-per-subgraph must be at least 1, not {targets_per_subgraph}")
    units = units or [[name] for name in targets]
    group_of = {name: i // targets_per_subgraph + 1 for i, unit in enumerate(units) for name in unit}
    last_of: dict[int, str] = {}  # each group's target that runs last
    for node in graph.nodes:
        name = _module_name(str(node.target)) if node.op == "call_module" else ""
        if name in group_of:
            last_of[group_of[name]] = name
    last_in_group = set(last_of.values())
    tail = max(group_of.values(), default=0) + 1

    place: dict[Node, int] = {}
    after: dict[Node, int] = {}  # the earliest subgraph a reader of this node may run in
    for node in graph.nodes:
        if node.op == "placeholder":
            place[node] = after[node] = 0
            continue
        if node.op == "output":
            continue
        earliest = max((after[n] for n in node.all_input_nodes), default=0)
        name = _module_name(str(node.target)) if node.op == "call_module" else ""
        if name in group_of:
            if earliest > group_of[name]:
                raise TraceFailure(
                    f"target {name} reads a value computed after its own subgraph ({node.format_node()}); "
                    "the targets are not in execution order. Pass --targets to choose other modules."
                )
            place[node] = group_of[name]
            after[node] = place[node] + 1 if name in last_in_group else place[node]
        else:
            place[node] = after[node] = earliest

    # an inline node is written inside its single user's expression, so it belongs to its user's subgraph
    for node in reversed(list(graph.nodes)):
        if node.op not in ("placeholder", "output") and is_inline(node):
            user = next(iter(node.users))
            if user.op != "output":
                place[node] = place[user]

    # a fresh leaf instance (an empty KV cache) or a constant literal is built in every subgraph that uses it, never
    # passed between them
    copies: dict[Node, list[int]] = {}
    for node in reversed(list(graph.nodes)):
        if (node.meta.get("seqgen_fresh") or node.meta.get("seqgen_literal")) and node.users:
            needed = sorted({p for user in node.users for p in (place.get(user, tail), *copies.get(user, ()))})
            place[node], copies[node] = needed[0], needed[1:]

    partitions = {i: Partition(index=i) for i in range(tail + 1)}
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        for index in (place[node], *copies.get(node, ())):
            partitions[index].nodes.append(node)
        part = partitions[place[node]]
        if node.op == "call_module":
            name = _module_name(str(node.target))
            if name in group_of:
                part.targets.append(name)

    output_node = next(n for n in graph.nodes if n.op == "output")
    graph_outputs = set(output_node.all_input_nodes)
    kept = [p for p in partitions.values() if any(not is_inline(n) for n in p.nodes)]
    for new_index, part in enumerate(kept):
        part.index = new_index
        members = set(part.nodes)
        for node in part.nodes:
            for source in node.all_input_nodes:
                if source not in members and not is_inline(source) and source not in part.inputs:
                    part.inputs.append(source)
            if node.op == "call_module":
                _add_unique(part.modules, _module_name(str(node.target)))
            elif node.op == "get_attr" and isinstance(_resolve(root, str(node.target)), torch.Tensor):
                _add_unique(part.tensors, _module_name(str(node.target)))
    for i, part in enumerate(kept):
        later_reads = {src for p in kept[i + 1 :] for src in p.inputs}
        part.outputs = [n for n in part.nodes if n in later_reads or n in graph_outputs]
        part.consumed = [n for n in part.inputs if n not in later_reads and n not in graph_outputs]
    return kept


def _add_unique(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)


def _resolve(root: torch.nn.Module, dotted: str) -> object:
    value: object = root
    for part in dotted.split("."):
        value = getattr(value, part)
    return value
