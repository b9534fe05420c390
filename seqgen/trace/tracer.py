"""An HF-aware torch.fx tracer (transformers 5 removed ``transformers.utils.fx``).

What it does beyond ``torch.fx.Tracer``:

* **Leaves.** Only call-graph ancestors of the sequential targets are traced through. Targets and every other module
  become ``call_module`` nodes, so forward hooks on them fire during calibration and their weights are never read
  at trace time. Mask builders and ``--ignore`` functions become ``call_function`` nodes (see :mod:`.leaves`).
* **A root with an explicit signature.** transformers forwards are decorated and take ``**kwargs``; the tracer
  calls the real (decorated) forward from a wrapper whose placeholders are exactly the sample input's names, with
  ``use_cache=False`` so that no cache object enters the graph. Module paths read ``model.<path>``.
* **Concrete values on demand.** When Python needs a real value of a traced one (``if``, ``len``, ``int``, loops),
  the producing nodes are run once on the ``meta`` device with the sample's shapes. The decision is returned, and a
  *guard* node is added so the generated code re-checks it on every batch.
* **Source names and locations.** Each node records the model-code line that created it, and takes the name of the
  first local variable it is bound to (``hidden_states``, ``causal_mask``), for the emitter.
* **Config objects** are referenced as ``model.config`` (or the owning submodule's config), never rebuilt.
"""

from __future__ import annotations

import inspect
import linecache
import logging
import os
import sysconfig
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.fx.node import Node, map_arg
from torch.fx.proxy import Attribute, Proxy

from ..errors import TraceFailure
from ..index import InputSpec
from ..runtime.guards import guard
from .leaves import modules_to_patch, resolve_leaf_functions
from .targets import find_targets

__all__ = ["InputSpec", "Guard", "Trace", "trace_model", "ROOT_NAME"]

logger = logging.getLogger(__name__)

ROOT_NAME = "model"  # the wrapper's child: graph paths read model.<path>, as the generated code does

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


@dataclass(frozen=True)
class Guard:
    """A control-flow decision frozen at trace time, re-checked on every batch by the generated code."""

    kind: str  # "bool", "len" or "int"
    expected: bool | int
    where: str  # "modeling_x.py:123"
    code: str  # the source line, stripped


@dataclass
class Trace:
    graph: torch.fx.Graph
    root: torch.nn.Module  # wrapper: root.model is the traced model
    targets: list[str]  # module names relative to the model
    inputs: list[InputSpec]
    guards: list[Guard] = field(default_factory=list)
    leaf_functions: list[Callable] = field(default_factory=list)

    @property
    def model(self) -> torch.nn.Module:
        return getattr(self.root, ROOT_NAME)


class _Root(torch.nn.Module):
    """Holds the model as its only child, so graph paths are ``model.<path>``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, ROOT_NAME, model)

    def forward(self, *inputs: Any) -> Any:  # pragma: no cover - replaced by the tracer's root function
        raise RuntimeError("_Root is only traced")


_TRACE_CODE = torch.fx.Tracer.trace.__code__  # frames above it belong to the caller, not the model


def _is_model_code(filename: str) -> bool:
    return not filename.startswith(_SKIP_DIRS) and not filename.startswith("<")


def _location(frame: Any) -> tuple[str, int, str]:
    code = frame.f_code
    return code.co_filename, frame.f_lineno, getattr(code, "co_qualname", code.co_name)


def short_where(loc: tuple[str, int, str] | None) -> str:
    if loc is None:
        return "<unknown>"
    return f"{os.path.basename(loc[0])}:{loc[1]}"


class _ProxyMixin:
    """Python protocol methods that need a concrete value: resolved from meta values and guarded."""

    tracer: SeqgenTracer

    def __len__(self) -> int:
        return self.tracer.concrete_len(self)  # type: ignore[arg-type]

    def __index__(self) -> int:
        return self.tracer.concrete_int(self)  # type: ignore[arg-type]

    def __int__(self) -> int:
        return self.tracer.concrete_int(self)  # type: ignore[arg-type]

    def __getattr__(self, k: str) -> Attribute:
        return SeqgenAttribute(self, k)  # type: ignore[arg-type]


class SeqgenProxy(_ProxyMixin, Proxy):
    pass


class SeqgenAttribute(_ProxyMixin, Attribute):
    pass


class SeqgenTracer(torch.fx.Tracer):
    """torch.fx Tracer for transformers models; see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        targets: list[str],
        inputs: list[InputSpec],
        leaf_functions: list[Callable],
        call_kwargs: dict[str, Any],
    ) -> None:
        super().__init__(autowrap_functions=tuple(leaf_functions), param_shapes_constant=False)
        self.model = model
        self.inputs = inputs
        self.call_kwargs = call_kwargs
        modules = dict(model.named_modules())
        self._targets = {id(modules[t]) for t in targets}
        ancestors: set[int] = {id(model)}
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts)):
                ancestors.add(id(modules[".".join(parts[:i])]))
        self._ancestors = ancestors
        self._autowrap_search.extend(modules_to_patch(model))
        self.guards: list[Guard] = []
        self._values: dict[Node, Any] = {}
        self._config_paths = self._find_configs(model)

    # ---- structure -------------------------------------------------------------------------------------------

    @staticmethod
    def _find_configs(model: torch.nn.Module) -> dict[int, str]:
        paths: dict[int, str] = {}
        for name, module in model.named_modules():
            config = module.__dict__.get("config")
            if config is not None and id(config) not in paths:
                paths[id(config)] = f"{ROOT_NAME}.{name}.config" if name else f"{ROOT_NAME}.config"
        return paths

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _Root):
            return False
        return id(m) in self._targets or id(m) not in self._ancestors

    def proxy(self, node: Node) -> Proxy:
        return SeqgenProxy(node, self)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore[override]
        names = [spec.name for spec in self.inputs]
        call_kwargs = self.call_kwargs

        def root_forward(root: _Root, *values: Any) -> dict[str, Any]:
            output = getattr(root, ROOT_NAME)(**dict(zip(names, values)), **call_kwargs)
            logits = output[0] if isinstance(output, tuple) else output["logits"]
            return {"logits": logits}

        placeholders = [self.create_proxy("placeholder", name, (), {}) for name in names]
        return root_forward, [self.root, *placeholders]

    def create_arg(self, a: Any) -> Any:
        if _is_config(a):
            path = self._config_paths.get(id(a))
            if path is None:
                raise TraceFailure(
                    f"traced code passes a {type(a).__name__} that belongs to no module of the model; seqgen refers "
                    "to configs as `model.<path>.config` and never rebuilds one. Mark the function that receives it "
                    "as a leaf with --ignore NAME."
                )
            return self.create_node("get_attr", path, (), {})
        if (
            inspect.isfunction(a)
            and "<locals>" not in a.__qualname__
            and getattr(inspect.getmodule(a), a.__name__, None) is a
        ):
            return a  # an importable function passed as a value (e.g. a mask function)
        return super().create_arg(a)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[override]
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        frame = inspect.currentframe()
        location = None
        while frame is not None and frame.f_code is not _TRACE_CODE:
            if _is_model_code(frame.f_code.co_filename):
                if location is None:
                    location = _location(frame)
                self._name_from_locals(frame)
            frame = frame.f_back
        node.meta["seqgen_loc"] = location
        return node

    @staticmethod
    def _name_from_locals(frame: Any) -> None:
        """Give each traced value the first local name it is bound to in model code."""
        for name, value in frame.f_locals.items():
            if name == "self" or name.startswith("_"):
                continue
            if isinstance(value, Attribute) and value._node is None:
                continue
            if isinstance(value, Proxy):
                value.node.meta.setdefault("seqgen_source_name", name)

    # ---- concrete values and guards ----------------------------------------------------------------------------

    def _concrete(self, node: Node, why: str) -> Any:
        """Value of ``node`` for the sample input, computed on the meta device."""
        if node in self._values:
            return self._values[node]
        order: list[Node] = []
        seen: set[Node] = set()
        stack: list[tuple[Node, bool]] = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if current in self._values or (current in seen and not expanded):
                continue
            if expanded:
                order.append(current)
                continue
            seen.add(current)
            stack.append((current, True))
            stack.extend((n, False) for n in current.all_input_nodes if n not in self._values)
        with _maybe_revert_all_patches(), torch.no_grad():
            for current in order:
                try:
                    self._values[current] = self._run_node(current)
                except Exception as exc:
                    raise TraceFailure(
                        f"{why} needs the value of `{current.format_node()}` "
                        f"({short_where(current.meta.get('seqgen_loc'))}), which cannot be computed from shapes "
                        f"alone on the meta device: {type(exc).__name__}: {exc}. This is control flow on tensor "
                        "contents; mark the function that contains it as a leaf with --ignore NAME, or make its "
                        "module a target with --targets."
                    ) from exc
        return self._values[node]

    def _run_node(self, node: Node) -> Any:
        args = map_arg(node.args, self._values.__getitem__)
        kwargs = map_arg(node.kwargs, self._values.__getitem__)
        if node.op == "placeholder":
            return next(s for s in self.inputs if s.name == node.target).meta_tensor()
        if node.op == "get_attr":
            value: Any = self.root
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return value
        if node.op == "call_function":
            if node.target is guard:
                return None
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        raise AssertionError(node.op)

    def _caller(self) -> tuple[tuple[str, int, str] | None, str]:
        frame = inspect.currentframe()
        while frame is not None and not _is_model_code(frame.f_code.co_filename):
            frame = frame.f_back
        if frame is None:
            return None, ""
        loc = _location(frame)
        return loc, linecache.getline(loc[0], loc[1]).strip()

    def _add_guard(self, kind: str, value_proxy: Proxy, expected: bool | int) -> None:
        loc, code = self._caller()
        where = short_where(loc)
        label = f"{where}: {code}" if code else where
        node = self.create_proxy("call_function", guard, (value_proxy, expected, label), {}).node
        node.meta["seqgen_guard"] = len(self.guards)
        self.guards.append(Guard(kind=kind, expected=expected, where=where, code=code))

    def to_bool(self, obj: Proxy) -> bool:
        loc, code = self._caller()
        value = self._concrete(obj.node, f"`{code}` ({short_where(loc)})")
        try:
            result = bool(value)
        except Exception as exc:
            raise TraceFailure(
                f"`{code}` ({short_where(loc)}) branches on tensor contents ({type(exc).__name__}: {exc}); tracing "
                "on the meta device only knows shapes. Mark the function that contains it as a leaf with "
                "--ignore NAME, or make its module a target with --targets."
            ) from exc
        self._add_guard("bool", obj, result)
        return result

    def concrete_len(self, obj: Proxy) -> int:
        loc, code = self._caller()
        value = self._concrete(obj.node, f"len() at {short_where(loc)}")
        n = len(value)
        if not _is_shape(obj.node):  # a shape's length is the input rank, which the loader checks
            self._add_guard("len", self.create_proxy("call_function", len, (obj,), {}), n)
        return n

    def concrete_int(self, obj: Proxy) -> int:
        loc, code = self._caller()
        value = int(self._concrete(obj.node, f"int() at {short_where(loc)}"))
        self._add_guard("int", obj, value)
        return value

    def iter(self, obj: Proxy) -> Iterator:
        n = self.concrete_len(obj)
        return iter([obj[i] for i in range(n)])


def _model_frame_of(exc: BaseException) -> str:
    """' near file:line (`code`)' for the innermost model-code frame of a traceback, or ''."""
    found = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if _is_model_code(filename):
            found = f" near {os.path.basename(filename)}:{lineno} (`{linecache.getline(filename, lineno).strip()}`)"
    return found


def _is_shape(node: Node) -> bool:
    return (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") or (
        node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs
    )


def _is_config(a: Any) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover
        return False
    return isinstance(a, PretrainedConfig)


def _call_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Concrete arguments for every forward parameter that the sample does not give: no cache, a dict output."""
    params = inspect.signature(inspect.unwrap(type(model).forward)).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    if "use_cache" in params or open_kwargs:
        kwargs["use_cache"] = False
    if "return_dict" in params:
        kwargs["return_dict"] = True
    return kwargs


def _dead_code_elimination(graph: torch.fx.Graph) -> None:
    def impure(node: Node) -> bool:
        if node.op in ("placeholder", "output"):
            return True
        if node.op == "call_function" and node.target is guard:
            return True
        if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("__"):
            return True  # in-place tensor method
        return node.op == "call_function" and getattr(node.target, "__name__", "") in ("setitem", "__setitem__")

    for node in reversed(list(graph.nodes)):
        if not node.users and not impure(node):
            graph.erase_node(node)


def trace_model(
    model: torch.nn.Module,
    inputs: list[InputSpec],
    *,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
) -> Trace:
    """Trace ``model`` (best on the meta device) for the given sample input signature."""
    target_names = find_targets(model, targets)
    leaves = resolve_leaf_functions(model, ignore or [])
    root = _Root(model)
    tracer = SeqgenTracer(model, target_names, inputs, leaves, _call_kwargs(model))
    try:
        graph = tracer.trace(root)
    except TraceFailure:
        raise
    except Exception as exc:
        where = _model_frame_of(exc)
        raise TraceFailure(
            f"tracing {type(model).__name__} failed{where}: {type(exc).__name__}: {exc}. If this is a helper "
            "that branches on tensor contents, pass --ignore NAME to call it as a leaf; if it is inside a module "
            "that need not be traced, pass --targets to change the sequential targets."
        ) from exc
    _dead_code_elimination(graph)
    called = {
        node.target[len(ROOT_NAME) + 1 :] for node in graph.nodes if node.op == "call_module"
    }
    missing = [t for t in target_names if t not in called]
    if missing:
        raise TraceFailure(
            f"{type(model).__name__}: {len(missing)} sequential target(s) never ran in the traced forward "
            f"(first: {missing[0]}). Choose targets that the forward calls, with --targets."
        )
    return Trace(graph=graph, root=root, targets=target_names, inputs=inputs, guards=tracer.guards,
                 leaf_functions=leaves)
