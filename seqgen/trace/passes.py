"""Graph passes run on a finished trace, before partitioning: each leaves the model's numerics unchanged.

* :func:`drop_moves_to_the_trace_device`: ``x.to(self.device)`` with the meta device of tracing is dropped.
* :func:`remove_identities`: ``arange + 0`` on an integer tensor and full slices ``x[:, 0:, :]`` are replaced by
  their operand, where the traced values prove them identities.
* :func:`eliminate_dead_code`: values nothing reads are dropped, except guards, checks and in-place updates.
* :func:`check_fresh_instances`: a fresh leaf instance (a KV cache) is refused where a read would follow a write.
* :func:`mark_subexpressions`: an unnamed value that one expression on the same source line reads
  (``inputs_embeds + position_embeds.to(device)``) is written inside that expression instead of as a statement
  of its own named after its op.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx.node import Node

from ..errors import TraceFailure
from ..runtime.guards import guard
from .frames import short_where

__all__ = [
    "check_fresh_instances",
    "SUBEXPRESSION",
    "drop_moves_to_the_trace_device",
    "eliminate_dead_code",
    "is_impure",
    "mark_subexpressions",
    "remove_identities",
]

SUBEXPRESSION = "seqgen_subexpression"  # node meta key: written inside its single user's expression


def is_impure(node: Node) -> bool:
    """Nodes kept although nothing reads them: guards, checks, module-state effects and in-place updates."""
    if node.op in ("placeholder", "output") or node.meta.get("seqgen_impure"):
        return True
    if node.op == "call_function" and node.target is guard:
        return True
    if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("__"):
        return True  # in-place tensor method
    return node.op == "call_function" and getattr(node.target, "__name__", "") in ("setitem", "__setitem__")


def eliminate_dead_code(graph: torch.fx.Graph) -> None:
    graph.eliminate_dead_code(is_impure_node=is_impure)


def drop_moves_to_the_trace_device(graph: torch.fx.Graph) -> None:
    """``x.to(self.device)`` in model code (Idefics3's embeddings): ``self.device`` is the meta device while tracing,
    a constant no generated code can hold. A package runs every subgraph on one execution device, where such a
    move does nothing, so the move is dropped (a dtype given with it is kept)."""

    def is_meta(a: Any) -> bool:
        return isinstance(a, torch.device) and a.type == "meta"

    for node in list(graph.nodes):
        if node.op != "call_method" or node.target != "to":
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        if len(args) > 1 and is_meta(args[1]):
            del args[1]
        elif is_meta(kwargs.get("device")):
            del kwargs["device"]
        else:
            continue
        if len(args) == 1 and not kwargs:
            node.replace_all_uses_with(args[0])
            graph.erase_node(node)
        else:
            node.args, node.kwargs = tuple(args), kwargs


# ---- identities ------------------------------------------------------------------------------------------------


def remove_identities(graph: torch.fx.Graph, value_of: Callable[[Node], Any]) -> None:
    """Replace each provable identity by its operand; the operand takes the identity's source name if it has none.

    ``value_of`` gives a node's traced (meta) value, or None where it cannot be computed. Only an operand that nothing
    else reads is substituted, so that no other reader sees it aliased or mutated in place.
    """
    for node in list(graph.nodes):
        operand = _identity_operand(node, value_of)
        if operand is None:
            continue
        name = node.meta.get("seqgen_source_name")
        if name:
            operand.meta.setdefault("seqgen_source_name", name)
        node.replace_all_uses_with(operand)
        graph.erase_node(node)


def _identity_operand(node: Node, value_of: Callable[[Node], Any]) -> Node | None:
    """The operand of ``node`` if ``node`` is ``x + 0``, ``0 + x``, ``x - 0`` on integers or a full slice of a
    tensor; structure is checked first, so traced values are computed only for candidates."""
    if node.op != "call_function" or node.kwargs or len(node.args) != 2:
        return None
    operand, other = node.args
    if node.target is operator.add and _is_int_zero(operand):
        operand, other = other, operand
    if not isinstance(operand, Node) or len(operand.users) != 1 or operand.op in ("placeholder", "get_attr"):
        return None
    if node.target in (operator.add, operator.sub) and _is_int_zero(other):
        value = value_of(operand)  # a float plus 0 turns -0.0 into 0.0; a bool tensor plus 0 is an int64 tensor
        integer = isinstance(value, torch.Tensor) and not (
            value.dtype.is_floating_point or value.dtype.is_complex or value.dtype is torch.bool
        )
        return operand if integer or type(value) is int else None
    if node.target is operator.getitem and _is_full_slice(other):
        value = value_of(operand)
        rank = value.dim() if isinstance(value, torch.Tensor) else -1
        return operand if len(_slices(other)) <= rank else None
    return None


def _is_int_zero(a: Any) -> bool:
    return type(a) is int and a == 0


def _slices(index: Any) -> list[Any]:
    return [i for i in (index if isinstance(index, tuple) else (index,)) if i is not Ellipsis]


def _is_full_slice(index: Any) -> bool:
    """``x[:]``, ``x[:, 0:, :]``, ``x[..., :]``: every index a slice from the start to the end in steps of 1."""
    items = index if isinstance(index, tuple) else (index,)
    slices = _slices(index)
    if not items or len(items) - len(slices) > 1:
        return False
    return all(isinstance(s, slice) and s.start in (None, 0) and s.stop is None and s.step in (None, 1) for s in slices)


# ---- subexpressions --------------------------------------------------------------------------------------------


def mark_subexpressions(graph: torch.fx.Graph, leaf_functions: set[Callable]) -> None:
    """Mark op-named values to be written inside their single reader's expression on the same source line.

    A value qualifies if the source gives it no name, it is a plain function or method call (no module, leaf, check
    or in-place update), and only such calls run between it and its reader: writing it later then computes the
    same thing."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    nodes = list(graph.nodes)
    for node in nodes:
        if not _unnamed_plain_call(node, leaf_functions) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op == "output" or user.meta.get("seqgen_fresh") or user.meta.get("seqgen_literal"):
            continue
        loc, user_loc = node.meta.get("seqgen_loc"), user.meta.get("seqgen_loc")
        if loc is None or user_loc is None or loc[:2] != user_loc[:2]:
            continue
        between = nodes[order[node] + 1 : order[user]]
        if all(_reorderable(n, leaf_functions) for n in between):
            node.meta[SUBEXPRESSION] = True


def _unnamed_plain_call(node: Node, leaf_functions: set[Callable]) -> bool:
    if node.meta.get("seqgen_source_name") or not _reorderable(node, leaf_functions):
        return False
    if node.op != "call_function" and node.op != "call_method":
        return False
    # an item of a named value is named after it (layer_outputs_0); keep it a statement
    return not (node.target is operator.getitem and isinstance(node.args[1], (int, str)))


def _reorderable(node: Node, leaf_functions: set[Callable]) -> bool:
    """A computation whose result does not depend on when it runs, among pure computations."""
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method") or is_impure(node):
        return False
    if node.meta.get("seqgen_leaf_method") or node.meta.get("seqgen_fresh") or node.meta.get("seqgen_literal"):
        return False
    if node.op == "call_function" and (node.target in leaf_functions or isinstance(node.target, type)):
        return False
    return "rand" not in getattr(node.target, "__name__", str(node.target))  # random draws keep their order


def check_fresh_instances(graph: torch.fx.Graph, targets: set[str]) -> None:
    """A fresh instance (a KV cache) is built anew in each subgraph, which is only right if model code reads it before
    the first layer writes it: a read after a layer would see what that layer wrote in eager mode. ``targets`` are
    the sequential targets' paths in the graph (``model.model.layers.0``)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if not node.meta.get("seqgen_fresh"):
            continue
        writes = [order[u] for u in node.users if u.op == "call_module" and u.target in targets]
        late = [u for u in node.users if writes and order[u] > min(writes) and order[u] not in writes]
        if late:
            raise TraceFailure(
                f"{late[0].format_node()} ({short_where(late[0].meta.get('seqgen_loc'))}) reads a "
                f"{node.target.__name__} after a layer wrote to it; the package builds one per subgraph"
            )
