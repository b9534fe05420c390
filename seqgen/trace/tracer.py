"""An HF-aware torch.fx tracer (transformers 5 removed ``transformers.utils.fx``).

What it does beyond ``torch.fx.Tracer``:

* **Leaves.** Only call-graph ancestors of the sequential targets are traced through. Targets and every other module
  become ``call_module`` nodes, so forward hooks on them fire during calibration and their weights are never read
  at trace time. Mask builders, runtime checks and ``--ignore`` functions become ``call_function`` nodes, leaf
  methods (``--ignore Class.method``) ``call_method`` nodes on their module (see :mod:`.leaves`).
* **A root with an explicit signature.** transformers forwards are decorated and take ``**kwargs``; the tracer
  calls the real (decorated) forward from a wrapper whose placeholders are exactly the sample input's names, with
  the model's default ``use_cache`` as in ``model(**batch)``. Module paths read ``model.<path>``.
* **KV caches and other leaf instances.** A cache the forward builds is a graph node that each subgraph builds anew
  (a layer writes only its own slot), so the layers see eager mode's cache path (whose numerics can differ from
  running without one) and re-running a subgraph is idempotent. A model whose cache cannot be built that way is
  traced with ``use_cache=False`` (logged). Objects shared between layers (``KVSharingDict``) are built once.
* **Concrete values on demand.** When Python needs a real value of a traced one (``if``, ``len``, ``int``, loops),
  the producing nodes are run once on the ``meta`` device with the sample's shapes; a leaf function that reads tensor
  contents runs on CPU stand-ins of those shapes. The decision is returned, and a *guard* node is added so the
  generated code re-checks it on every batch.
* **Structured results.** A leaf module's tuple output with ``None`` entries is returned as a tuple (each ``None``
  guarded), and a leaf function's dict or tuple result as a container of items, so ``out[1] is not None`` and
  ``isinstance(masks, dict)`` take eager mode's branch.
* **Buffers and factory functions.** Buffers read in traced code become ``get_attr`` nodes like parameters, and
  torch factory functions (``torch.zeros(batch, n)``, ``torch.finfo(x.dtype)``) called with traced arguments become
  graph nodes instead of failing, so sizes and dtypes stay symbolic in the generated code. ``hasattr`` on a weight
  answers for the real weight.
* **Assertions.** ``assert`` on tensor contents cannot be decided from shapes; it is kept as a guard that the
  generated code checks on every batch, which is what the assertion does in eager mode.
* **Module state.** A traced value stored on a module whose forward is traced is seen by later traced reads and
  undone after tracing; stored on any other module, it would be read by untraced code, which is refused.
* **Source names and locations.** Each node records the model-code line that created it, and takes the name of the
  first local variable it is bound to (``hidden_states``, ``causal_mask``; ``masks_full_attention`` for a dict item),
  for the emitter.
* **Config objects** are referenced as ``model.config`` (or the owning submodule's config), never rebuilt.

Errors name the module, the source line and the construct, and the option that would get past it.

The tracer's parts: :mod:`.proxies` (proxies, meta evaluation), :mod:`.patches` (the global patches of tracing, one
context manager), :mod:`.passes` (graph passes after tracing), :mod:`.frames` (which frames are model code).
"""

from __future__ import annotations

import inspect
import linecache
import logging
import operator
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
from .frames import (
    first_line,
    frame_location,
    in_assertion,
    innermost_model_frame,
    is_model_code,
    model_frame_of,
    model_line,
    short_where,
)
from .leaves import (
    CACHE_NUMERICS,
    effect_functions,
    modules_to_patch,
    resolve_leaf_functions,
    resolve_leaf_methods,
)
from .passes import (
    check_fresh_instances,
    drop_moves_to_the_trace_device,
    eliminate_dead_code,
    mark_subexpressions,
    remove_identities,
)
from .patches import LeafPatches, module_state_journal, tracing_patches
from .proxies import InstanceProxy, SeqgenProxy, run_leaf_function, weights_on_meta
from .targets import find_target_units

__all__ = ["InputSpec", "Guard", "Trace", "trace_model", "ROOT_NAME"]

logger = logging.getLogger(__name__)

ROOT_NAME = "model"  # the wrapper's child: graph paths read model.<path>, as the generated code does


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
    skipped_targets: list[str] = field(default_factory=list)  # default targets the forward never runs
    units: list[list[str]] = field(default_factory=list)  # targets that share a subgraph (parts of one block)

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
# Constant tensors made in forward with at most this many elements are written into the generated code as literals.
_MAX_LITERAL_TENSOR = 16


class SeqgenTracer(torch.fx.Tracer):
    """torch.fx Tracer for transformers models; see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        targets: list[str],
        inputs: list[InputSpec],
        leaf_functions: list[Callable],
        call_kwargs: dict[str, Any],
        leaf_methods: list[tuple[type, str]] = (),  # type: ignore[assignment]
    ) -> None:
        super().__init__(autowrap_functions=tuple(leaf_functions), param_shapes_constant=False)
        self.proxy_buffer_attributes = True
        self._leaf_functions = set(leaf_functions)
        self.effect_functions = effect_functions()
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
        self.leaf_patches = LeafPatches(modules_to_patch(model), leaf_functions, list(leaf_methods), self)
        self.guards: list[Guard] = []
        self._values: dict[Node, Any] = {}
        self._failures: dict[Node, Exception] = {}
        self._len_guarded: set[Node] = set()
        self._config_paths = self._find_configs(model)
        self._literals: dict[int, tuple[torch.Tensor, Node]] = {}

    def trace(self, root, concrete_args=None):  # type: ignore[override]
        with tracing_patches(self):
            return super().trace(root, concrete_args)

    def create_instance(self, cls: type, fresh: bool, args: tuple, kwargs: dict) -> Proxy:
        """A leaf class instantiated by traced code: a node whose proxy passes ``isinstance(proxy, cls)``."""
        proxy = self.create_proxy(
            "call_function", cls, args, kwargs, proxy_factory_fn=lambda node: InstanceProxy(node, self, cls)
        )
        proxy.node.meta["seqgen_fresh"] = fresh
        return proxy

    # ---- structure -------------------------------------------------------------------------------------------

    @staticmethod
    def _find_configs(model: torch.nn.Module) -> dict[int, str]:
        paths: dict[int, str] = {}
        for name, module in model.named_modules():
            config = module.__dict__.get("config")
            if config is not None and id(config) not in paths:
                paths[id(config)] = f"{ROOT_NAME}.{name}.config" if name else f"{ROOT_NAME}.config"
        return paths

    def is_traced_through(self, module: torch.nn.Module) -> bool:
        """Whether ``module``'s forward is traced: an ancestor of a sequential target, not a target itself."""
        return id(module) in self._ancestors and id(module) not in self._targets

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
            output = getattr(root, ROOT_NAME)(**dict(zip(names, values, strict=True)), **call_kwargs)
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
        if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter) and a not in self.tensor_attrs:
            return self._constant_tensor(a)
        return super().create_arg(a)

    def _constant_tensor(self, a: torch.Tensor) -> Node:
        """A tensor made in forward from no traced value (``eps = torch.tensor(1e-5)``), written out as a literal in
        each subgraph that uses it. torch.fx would store it as an attribute of the traced root, which no package file
        could hold."""
        if type(a) is not torch.Tensor or a.device.type != "cpu" or a.numel() > _MAX_LITERAL_TENSOR:
            loc, code = model_line()
            raise TraceFailure(
                f"{short_where(loc)}: `{code}` uses a constant {a.device.type} tensor of shape {tuple(a.shape)} made "
                f"while tracing; only CPU constants of up to {_MAX_LITERAL_TENSOR} elements are written into the "
                "generated code. Pass --ignore NAME for the function that makes or uses it, so that it runs as a leaf."
            )
        known = self._literals.get(id(a))
        if known is not None and known[0] is a:
            return known[1]
        node = self.create_node("call_function", torch.tensor, (a.tolist(),), {"dtype": a.dtype})
        node.meta["seqgen_literal"] = True
        self._literals[id(a)] = (a, node)  # the tensor is kept, so its id is not reused
        frame = innermost_model_frame()
        if frame is not None:  # named after the model code's local, as traced values are
            name = next((k for k, v in frame.f_locals.items() if v is a and not k.startswith("_")), None)
            if name is not None:
                node.meta["seqgen_source_name"] = name
        del frame
        return node

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[override]
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        frame = inspect.currentframe()
        location = None
        while frame is not None and frame.f_code is not _TRACE_CODE:
            if is_model_code(frame.f_code.co_filename):
                if location is None:
                    location = frame_location(frame)
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
            elif isinstance(value, (dict, tuple, list)) and value:
                # a container of one node's items (a dict of masks) names that node; a dict of separate values
                # ({"full_attention": mask, ...}) names each value by its key
                items = value.items() if isinstance(value, dict) else enumerate(value)
                for key, item in items:
                    if not isinstance(item, Proxy) or isinstance(item, Attribute):
                        continue
                    if item.node.target is operator.getitem and isinstance(item.node.args[0], Node):
                        item.node.args[0].meta.setdefault("seqgen_source_name", name)
                    elif isinstance(key, str):
                        item.node.meta.setdefault("seqgen_source_name", f"{name}_{key}")

    # ---- concrete values and guards ----------------------------------------------------------------------------

    def _concrete(self, node: Node) -> Any:
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
        # tensors that model code creates without a device must be meta too; state that modules set while they run
        # on meta (recurrent states) is undone
        with (
            _maybe_revert_all_patches(),
            self.leaf_patches.reverted(),
            torch.no_grad(),
            torch.device("meta"),
            module_state_journal(),
        ):
            for current in order:
                try:
                    if current in self._failures:
                        raise self._failures[current]
                    self._values[current] = self._run_node(current)
                except Exception as exc:
                    self._failures.setdefault(current, exc)
                    site, advice = self.site()
                    raise TraceFailure(
                        f"control flow on a traced value in {site} needs the value of `{current.format_node()}` "
                        f"({short_where(current.meta.get('seqgen_loc'))}), which cannot be computed from shapes "
                        f"alone on the meta device ({type(exc).__name__}: {first_line(exc)}). To trace past it, "
                        f"{advice}."
                    ) from exc
        return self._values[node]

    def traced_value(self, node: Node) -> Any:
        """The value of ``node`` for the sample on the meta device, or None where it cannot be computed."""
        try:
            return self._concrete(node)
        except TraceFailure:
            return None

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        result = super().call_module(m, forward, args, kwargs)
        if isinstance(result, Proxy) and result.node.op == "call_module" and self.is_leaf_module(m, ""):
            return self._structured(result)
        return result

    def leaf_result(self, proxy: Proxy) -> Any:
        """A leaf function's container result (a dict of masks) as a container of its items. Items are never
        specialized: whether a mask is None depends on the batch."""
        try:
            value = self._concrete(proxy.node)
        except TraceFailure:
            return proxy
        if type(value) is dict:
            return {key: proxy[key] for key in value}
        if type(value) in (tuple, list):
            return type(value)(proxy[i] for i in range(len(value)))
        return proxy

    def _structured(self, proxy: Proxy) -> Any:
        """A leaf module's tuple output with None entries, as a tuple: ``x if out[1] is not None else y`` must see
        the None (each one is guarded). Other outputs stay one proxy."""
        try:
            value = self._concrete(proxy.node)
        except TraceFailure:
            return proxy
        if type(value) not in (tuple, list) or not any(v is None for v in value):
            return proxy
        items = []
        for i, v in enumerate(value):
            item = proxy[i]
            if v is None:
                self._add_guard("bool", self.create_proxy("call_function", operator.is_, (item, None), {}), True)
                item = None
            items.append(item)
        return type(value)(items)

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
            if node.target in self._leaf_functions:
                return run_leaf_function(node.target, args, kwargs)
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            if node.meta.get("seqgen_leaf_method"):
                return run_leaf_function(getattr(args[0], str(node.target)), args[1:], kwargs)
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "call_module":
            module = self.root.get_submodule(str(node.target))
            try:
                with weights_on_meta(module):
                    return module(*args, **kwargs)
            except Exception:
                like = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                if id(module) not in self._targets or like is None:
                    raise
                # a decoder layer whose kernels have no meta implementation (grouped_mm of some dtypes): its output
                # is taken to be shaped like its hidden-states input; decisions taken from it are guarded
                logger.debug("%s cannot run on meta; its output is taken to be shaped like its input", node.target)
                return torch.empty_like(like, device="meta")
        raise AssertionError(node.op)

    def site(self) -> tuple[str, str]:
        """Where model code is running now, and what would help: ``("LlamaModel `model.model`, in
        LlamaModel.forward (modeling_llama.py:380): `code`", "pass --targets ...")``."""
        frame = innermost_model_frame()
        if frame is None:
            return "<unknown location>", "pass --targets to choose other sequential targets"
        loc = frame_location(frame)
        code = linecache.getline(loc[0], loc[1]).strip()
        owner = frame
        while owner is not None and not isinstance(owner.f_locals.get("self"), torch.nn.Module):
            owner = owner.f_back
        module = owner.f_locals["self"] if owner is not None else None
        try:
            path = self.path_of_module(module)[len(ROOT_NAME) + 1 :] if module is not None else ""
        except NameError:
            path = ""
        if module is None:
            who = ""
        else:
            who = f"{type(module).__name__} `{path}`, " if path else f"{type(module).__name__} (the model itself), "
        text = f"{who}in {loc[2]} ({short_where(loc)}): `{code}`"
        advice = []
        function = frame.f_code.co_name
        if "self" not in frame.f_locals:  # a helper function: it can be called as a leaf
            advice.append(f"call `{function}` as a leaf function with `--ignore {function}`")
        elif module is not None and owner is frame and function != "forward":  # a helper method of a traced module
            method = f"{type(module).__name__}.{function}"
            advice.append(f"call `{method}` as a leaf (the generated code calls it) with `--ignore {method}`")
        if module is not None and path:
            advice.append(
                f"make {type(module).__name__} a sequential target (it then runs untraced) with "
                f"`--targets {type(module).__name__}`"
            )
        else:
            advice.append("choose sequential targets that contain this code with `--targets`")
        return text, "; or ".join(advice)

    def _add_guard(self, kind: str, value_proxy: Proxy, expected: bool | int) -> None:
        loc, code = model_line()
        where = short_where(loc)
        label = f"{where}: {code}" if code else where
        node = self.create_proxy("call_function", guard, (value_proxy, expected, label), {}).node
        node.meta["seqgen_guard"] = len(self.guards)
        self.guards.append(Guard(kind=kind, expected=expected, where=where, code=code))

    def to_bool(self, obj: Proxy) -> bool:
        if in_assertion():
            try:
                holds = bool(self._concrete(obj.node))
            except Exception:
                holds = True  # decided by the data: the guard checks it on every batch, as the assertion would
            if holds:
                self._add_guard("bool", obj, True)
                return True
        value = self._concrete(obj.node)
        try:
            result = bool(value)
        except Exception as exc:
            site, advice = self.site()
            raise TraceFailure(
                f"{site} branches on tensor contents: tracing on the meta device knows shapes, not values "
                f"({type(exc).__name__}: {first_line(exc)}). To trace past it, {advice}."
            ) from exc
        self._add_guard("bool", obj, result)
        return result

    def concrete_len(self, obj: Proxy) -> int:
        value = self._concrete(obj.node)
        n = len(value)
        # a shape's length is the input rank, which the loader checks; list(x) asks twice (len, then iter)
        if not _is_shape(obj.node) and obj.node not in self._len_guarded:
            self._len_guarded.add(obj.node)
            self._add_guard("len", self.create_proxy("call_function", len, (obj,), {}), n)
        return n

    def concrete_int(self, obj: Proxy) -> int:
        value = int(self._concrete(obj.node))
        self._add_guard("int", obj, value)
        return value

    def iter(self, obj: Proxy) -> Iterator:
        n = self.concrete_len(obj)
        return iter([obj[i] for i in range(n)])


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


def _call_kwargs(model: torch.nn.Module, with_cache: bool) -> dict[str, Any]:
    """Concrete arguments for forward parameters that the sample does not give: a dict output, and ``use_cache=False``
    unless ``with_cache`` (then the model's own default applies, as in ``model(**batch)``)."""
    params = inspect.signature(inspect.unwrap(type(model).forward)).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    if ("use_cache" in params or open_kwargs) and not with_cache:
        kwargs["use_cache"] = False
    if "return_dict" in params:
        kwargs["return_dict"] = True
    return kwargs


def trace_model(
    model: torch.nn.Module,
    inputs: list[InputSpec],
    *,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
) -> Trace:
    """Trace ``model`` (best on the meta device) for the given sample input signature.

    The forward runs with ``use_cache=False``: calibration needs no KV cache, and keeping one per layer would hold every
    calibration token's keys and values. The few families whose attention gives other last bits with a cache than
    without (``CACHE_NUMERICS`` in :mod:`.leaves`) are traced with the model's own cache instead, so that the package
    equals ``model(**batch)`` exactly; each subgraph then builds its own empty cache (see ``LEAF_CLASSES``). If that
    fails, they fall back to ``use_cache=False``, which is logged.
    """
    units = find_target_units(model, targets)
    target_names = [name for unit in units for name in unit]
    leaves = resolve_leaf_functions(model, ignore or [])
    methods = resolve_leaf_methods(model, ignore or [])
    with_cache_error: TraceFailure | None = None
    if getattr(model.config, "model_type", None) in CACHE_NUMERICS:
        try:
            trace = _trace(model, inputs, target_names, leaves, methods, bool(targets), with_cache=True)
        except TraceFailure as exc:
            with_cache_error = exc
        else:
            trace.units = [[t for t in unit if t in trace.targets] for unit in units if set(unit) & set(trace.targets)]
            return trace
    trace = _trace(model, inputs, target_names, leaves, methods, bool(targets), with_cache=False)
    trace.units = [[t for t in unit if t in trace.targets] for unit in units if set(unit) & set(trace.targets)]
    if with_cache_error is not None:
        logger.warning(
            "%s is traced with use_cache=False, so its layers run without a KV cache (eager mode may differ in the "
            "last bits where attention reads keys back from a cache): %s",
            type(model).__name__,
            with_cache_error,
        )
    return trace


def _trace(
    model: torch.nn.Module,
    inputs: list[InputSpec],
    target_names: list[str],
    leaves: list[Callable],
    methods: list[tuple[type, str]],
    user_targets: bool,
    with_cache: bool,
) -> Trace:
    root = _Root(model)
    tracer = SeqgenTracer(model, target_names, inputs, leaves, _call_kwargs(model, with_cache), methods)
    try:
        graph = tracer.trace(root)
    except TraceFailure:
        raise
    except Exception as exc:
        where = model_frame_of(exc)
        raise TraceFailure(
            f"tracing {type(model).__name__} failed{where}: {type(exc).__name__}: {exc}. If this is a helper "
            "that branches on tensor contents, pass --ignore NAME to call it as a leaf; if it is inside a module "
            "that need not be traced, pass --targets to change the sequential targets."
        ) from exc
    drop_moves_to_the_trace_device(graph)
    eliminate_dead_code(graph)
    remove_identities(graph, tracer.traced_value)
    mark_subexpressions(graph, set(leaves))
    check_fresh_instances(graph, {f"{ROOT_NAME}.{t}" for t in target_names})
    called = {node.target[len(ROOT_NAME) + 1 :] for node in graph.nodes if node.op == "call_module"}
    calls: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target[len(ROOT_NAME) + 1 :], []).append(node)
    repeated = [t for t in target_names if len(calls.get(t, ())) > 1]
    if repeated:
        where = ", ".join(sorted({short_where(n.meta.get("seqgen_loc")) for n in calls[repeated[0]]}))
        raise TraceFailure(
            f"{type(model).__name__}: sequential target {repeated[0]} "
            f"({type(model.get_submodule(repeated[0])).__name__}) runs {len(calls[repeated[0]])} times in one "
            f"forward (called at {where}): the model loops over its layers, and each sequential target must run "
            "once, in order. Pass --targets with modules that run once per forward."
        )
    missing = [t for t in target_names if t not in called]
    if missing and (user_targets or len(missing) == len(target_names)):
        raise TraceFailure(
            f"{type(model).__name__}: {len(missing)} sequential target(s) never ran in the traced forward "
            f"(first: {missing[0]}). Choose targets that the forward calls, with --targets."
        )
    if missing:  # the model skips these layers for this input signature (mllama's cross-attention without images)
        logger.warning(
            "%s skips %d of its %d layers for inputs %s (%s); they get no subgraph",
            type(model).__name__,
            len(missing),
            len(target_names),
            ", ".join(s.name for s in inputs),
            ", ".join(missing),
        )
    return Trace(
        graph=graph,
        root=root,
        targets=[t for t in target_names if t in called],
        inputs=inputs,
        guards=tracer.guards,
        leaf_functions=leaves,
        skipped_targets=missing,
    )
