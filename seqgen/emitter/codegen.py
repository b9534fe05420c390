"""Render one partition as the body of ``forward(model, *, ...)``: one statement per op, named from the source.

Calls read like the model code: ``model.model.layers[0](hidden_states, attention_mask=causal_mask)``, operators are
infix, attribute reads are inlined (``inputs_embeds.shape[1]``), and leaf functions are imported from their own
module. A ``# file.py:line in Class.method`` comment is written where the source location changes.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import math
import operator
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx.node import Node, _get_qualified_name

from ..errors import EmitFailure
from ..partition import Partition, is_inline
from ..runtime.guards import guard
from ..trace.passes import SUBEXPRESSION
from ..trace.tracer import ROOT_NAME

__all__ = ["RenderedBody", "render_partition", "Imports"]

_BINARY = {
    operator.add: "+",
    operator.sub: "-",
    operator.mul: "*",
    operator.truediv: "/",
    operator.floordiv: "//",
    operator.mod: "%",
    operator.pow: "**",
    operator.matmul: "@",
    operator.and_: "&",
    operator.or_: "|",
    operator.xor: "^",
    operator.lshift: "<<",
    operator.rshift: ">>",
    operator.eq: "==",
    operator.ne: "!=",
    operator.lt: "<",
    operator.le: "<=",
    operator.gt: ">",
    operator.ge: ">=",
    operator.is_: "is",
    operator.is_not: "is not",
}
_UNARY = {operator.neg: "-", operator.pos: "+", operator.invert: "~", operator.not_: "not "}
# Python's operator precedence, for parentheses around a subexpression written inside another: higher binds tighter
_PRIMARY = 16  # calls, attribute reads, subscripts
_PRECEDENCE = {operator.pow: 15, operator.neg: 14, operator.pos: 14, operator.invert: 14}
_PRECEDENCE |= dict.fromkeys((operator.mul, operator.matmul, operator.truediv, operator.floordiv, operator.mod), 13)
_PRECEDENCE |= {operator.add: 12, operator.sub: 12, operator.lshift: 11, operator.rshift: 11, operator.and_: 10}
_PRECEDENCE |= {operator.xor: 9, operator.or_: 8, operator.not_: 6}
_COMPARISON = 7
_PRECEDENCE |= dict.fromkeys(
    (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.is_, operator.is_not),
    _COMPARISON,
)


@dataclass
class Imports:
    """``import x`` and ``from x import y`` lines of one file; sorted on output so files are deterministic."""

    modules: set[str] = field(default_factory=set)
    names: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, attribute)

    def name_for(self, module: str, attr: str) -> str:
        local = attr
        while local in self.names and self.names[local] != (module, attr):
            local = local + "_"
        self.names[local] = (module, attr)
        return local

    def lines(self) -> list[str]:
        lines = [f"import {m}" for m in sorted(self.modules)]
        by_module: dict[str, list[str]] = {}
        for local, (module, attr) in sorted(self.names.items()):
            by_module.setdefault(module, []).append(attr if local == attr else f"{attr} as {local}")
        lines += [f"from {m} import {', '.join(sorted(attrs))}" for m, attrs in sorted(by_module.items())]
        return lines


@dataclass
class RenderedBody:
    lines: list[str]
    imports: Imports


def _module_expr(root: torch.nn.Module, target: str) -> str:
    """``model.model.layers[0]`` for the dotted path ``model.model.layers.0``."""
    parts = target.split(".")
    if parts[0] != ROOT_NAME:
        raise EmitFailure(f"graph refers to {target!r}, which is outside the model")
    expr, obj = ROOT_NAME, getattr(root, ROOT_NAME)
    for part in parts[1:]:
        if isinstance(obj, torch.nn.ModuleDict):
            expr += f"[{part!r}]"
        elif part.isdigit() and isinstance(obj, (torch.nn.ModuleList, torch.nn.Sequential)):
            expr += f"[{part}]"
        elif part.isidentifier():
            expr += f".{part}"
        else:
            expr = f"getattr({expr}, {part!r})"
        obj = getattr(obj, part)
    return expr


class _Renderer:
    def __init__(self, root: torch.nn.Module, names: dict[Node, str]) -> None:
        self.root = root
        self.names = names
        self.imports = Imports(modules={"torch"})

    # ---- values ---------------------------------------------------------------------------------------------

    def value(self, a: Any, in_subscript: bool = False) -> str:
        if isinstance(a, Node):
            return self.node_expr(a)
        if type(a).__module__ == "numpy" and callable(getattr(a, "item", None)) and getattr(a, "ndim", None) == 0:
            a = a.item()  # a numpy scalar (np.sqrt(d) in model code): the Python number with the same value
        if a is None or isinstance(a, (bool, str)):
            return repr(a)
        if isinstance(a, int):
            return repr(a)
        if isinstance(a, float):
            if math.isnan(a):
                return 'float("nan")'
            if math.isinf(a):
                return 'float("inf")' if a > 0 else 'float("-inf")'
            return repr(a)
        if a is Ellipsis:
            return "..."
        if isinstance(a, slice):
            if in_subscript:
                parts = ["" if v is None else self.value(v) for v in (a.start, a.stop)]
                text = ":".join(parts)
                return text + (":" + self.value(a.step) if a.step is not None else "")
            return f"slice({self.value(a.start)}, {self.value(a.stop)}, {self.value(a.step)})"
        if isinstance(a, tuple):
            if in_subscript and a:
                return ", ".join(self.value(v, in_subscript=True) for v in a)
            inner = ", ".join(self.value(v) for v in a)
            return f"({inner},)" if len(a) == 1 else f"({inner})"
        if isinstance(a, list):
            return "[" + ", ".join(self.value(v) for v in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{self.value(k)}: {self.value(v)}" for k, v in a.items()) + "}"
        if isinstance(a, (torch.dtype, torch.memory_format, torch.layout)):
            return str(a)
        if isinstance(a, torch.device):
            if a.type == "meta":
                raise EmitFailure(
                    "the traced graph holds the constant device 'meta' (code that does `device=...` with a fixed "
                    "device at trace time); pass --ignore NAME for the function that creates it"
                )
            return f"torch.device({str(a)!r})"
        if isinstance(a, enum.Enum):
            owner = self.imports.name_for(type(a).__module__, type(a).__qualname__.split(".")[0])
            return f"{owner}.{'.'.join(type(a).__qualname__.split('.')[1:] + [a.name])}"
        if callable(a):
            return self.function(a)
        raise EmitFailure(f"cannot write a constant of type {type(a).__name__} ({a!r}) into generated code")

    def node_expr(self, node: Node) -> str:
        if node.op == "get_attr":
            return _module_expr(self.root, str(node.target))
        if not is_inline(node):
            return self.names[node]
        if node.meta.get(SUBEXPRESSION):
            return self.expression(node)
        if node.target is getattr:
            return f"{self.operand(node.args[0], _PRIMARY)}.{node.args[1]}"
        return f"{self.operand(node.args[0], _PRIMARY)}[{node.args[1]}]"

    def operand(self, a: Any, binding: int) -> str:
        """``a`` where an expression of at least precedence ``binding`` is needed: parenthesized if it binds less."""
        text = self.value(a)
        return f"({text})" if isinstance(a, Node) and is_inline(a) and _precedence(a) < binding else text

    def function(self, fn: Any) -> str:
        qualified = _get_qualified_name(fn)
        if qualified.startswith("torch.") or qualified == "torch":
            return qualified
        if "." not in qualified:
            return qualified  # a builtin
        module, _, attr = qualified.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            found = None
        if found is not fn:
            raise EmitFailure(
                f"the traced graph calls {qualified}, which cannot be imported under that name; generated code "
                "needs every function importable. Pass --ignore with a function that can, or --targets."
            )
        return self.imports.name_for(module, attr)

    def call_args(self, args: tuple, kwargs: dict) -> str:
        parts = [self.value(a) for a in args] + [f"{k}={self.value(v)}" for k, v in kwargs.items()]
        return ", ".join(parts)

    # ---- statements -----------------------------------------------------------------------------------------

    def expression(self, node: Node) -> str:
        if node.op == "call_module":
            module = self.root.get_submodule(str(node.target))
            args, kwargs = _with_keywords(module, node.args, node.kwargs)
            return f"{_module_expr(self.root, str(node.target))}({self.call_args(args, kwargs)})"
        if node.op == "call_method":
            obj, *rest = node.args
            return f"{self.operand(obj, _PRIMARY)}.{node.target}({self.call_args(tuple(rest), node.kwargs)})"
        target = node.target
        if target is operator.getitem:
            return f"{self.operand(node.args[0], _PRIMARY)}[{self.value(node.args[1], in_subscript=True)}]"
        if target is getattr:
            return f"{self.operand(node.args[0], _PRIMARY)}.{node.args[1]}"
        if target is operator.setitem:
            obj, key, item = node.args
            return f"{self.operand(obj, _PRIMARY)}[{self.value(key, in_subscript=True)}] = {self.value(item)}"
        if target in _BINARY and len(node.args) == 2 and not node.kwargs:
            left, right = _operand_bindings(target)
            return f"{self.operand(node.args[0], left)} {_BINARY[target]} {self.operand(node.args[1], right)}"
        if target in _UNARY and len(node.args) == 1:
            return f"{_UNARY[target]}{self.operand(node.args[0], _PRECEDENCE[target])}"
        if target is guard:
            self.imports.names["guard"] = ("seqgen.runtime.guards", "guard")
            return f"guard({self.call_args(node.args, node.kwargs)})"
        return f"{self.function(target)}({self.call_args(node.args, node.kwargs)})"


def _precedence(node: Node) -> int:
    if node.op == "call_function" and len(node.args) in (1, 2) and not node.kwargs:
        return _PRECEDENCE.get(node.target, _PRIMARY)
    return _PRIMARY


def _operand_bindings(target: Any) -> tuple[int, int]:
    """The precedence each operand of a binary operator needs to be written without parentheses."""
    precedence = _PRECEDENCE[target]
    if precedence == _COMPARISON:  # a < b == c would chain
        return precedence + 1, precedence + 1
    if target is operator.pow:  # right-associative, and -x ** 2 is -(x ** 2)
        return _PRIMARY, _PRECEDENCE[operator.neg]
    return precedence, precedence + 1


def _with_keywords(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A module call's arguments after the first as keywords, named from its ``forward`` signature, so calls read
    ``layer(hidden_states, attention_mask=causal_mask, head_mask=None)``. The first stays positional: forward hooks
    read it from their ``args``."""
    if len(args) < 2:
        return args, kwargs
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return args, kwargs
    named = params[: len(args)]
    if len(named) < len(args) or any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in named):
        return args, kwargs
    if any(p.name in kwargs for p in named):
        return args, kwargs
    return args[:1], {**{p.name: a for p, a in zip(named[1:], args[1:], strict=True)}, **kwargs}


def _location_comment(node: Node) -> tuple[str, int, str] | None:
    return node.meta.get("seqgen_loc")


def render_partition(part: Partition, root: torch.nn.Module, names: dict[Node, str]) -> RenderedBody:
    renderer = _Renderer(root, names)
    lines: list[str] = []
    last_loc: tuple[str, int] | None = None
    for node in part.nodes:
        if is_inline(node):
            continue
        loc = _location_comment(node)
        if loc is not None and (loc[0], loc[1]) != last_loc:
            note = " (built anew in each subgraph that uses it)" if node.meta.get("seqgen_fresh") else ""
            lines.append(f"# {os.path.basename(loc[0])}:{loc[1]} in {loc[2]}{note}")
            last_loc = (loc[0], loc[1])
        try:
            expr = renderer.expression(node)
        except EmitFailure as exc:
            if loc is None:
                raise
            raise EmitFailure(f"{exc} (at {os.path.basename(loc[0])}:{loc[1]} in {loc[2]})") from None
        lines.append(expr if not node.users else f"{names[node]} = {expr}")
    returned = ", ".join(f'"{names[n]}": {names[n]}' for n in part.outputs)
    lines.append(f"return {{{returned}}}")
    return RenderedBody(lines=lines, imports=renderer.imports)
