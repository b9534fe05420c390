"""The global patches active while a model is traced, as one context manager (:func:`tracing_patches`).

* Leaf classes and leaf functions in the globals of the model's modules are replaced by stand-ins that add graph
  nodes; leaf methods are replaced on their classes (see :mod:`.leaves`).
* torch factory functions (``torch.zeros(batch, n)``) called with traced arguments become graph nodes.
* ``Module.__setattr__`` keeps a journal: a traced value stored on a module whose forward is traced is undone after
  tracing, and one stored on any other module is refused. The same journal (:func:`module_state_journal`) undoes
  the state that modules set while they run on meta values for a concrete value.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch.fx.proxy import Proxy

from ..errors import TraceFailure
from .frames import model_line, short_where
from .leaves import leaf_class, leaf_methods
from .proxies import real_attribute

if TYPE_CHECKING:
    from .tracer import SeqgenTracer

__all__ = ["LeafPatches", "module_state_journal", "tracing_patches"]


def _has_proxy(value: Any) -> bool:
    """Whether ``value`` is a traced value or a container holding one."""
    found: list[Proxy] = []
    torch.fx.node.map_aggregate(value, lambda a: found.append(a) if isinstance(a, Proxy) else a)
    return bool(found)


def _leaf_method_wrapper(name: str, tracer: SeqgenTracer, effect: bool) -> Callable:
    def wrapper(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        path = tracer.path_of_module(module)
        owner = tracer.create_proxy("get_attr", path, (), {})  # path_of_module is relative to the root: model.x
        proxy = tracer.create_proxy("call_method", name, (owner, *args), kwargs)
        proxy.node.meta["seqgen_leaf_method"] = True
        if effect:
            proxy.node.meta["seqgen_impure"] = True  # called for its effect on the model
            return proxy
        return tracer.leaf_result(proxy)

    return wrapper


def _leaf_function_wrapper(fn: Callable, tracer: SeqgenTracer) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _has_proxy((args, kwargs)):
            return fn(*args, **kwargs)
        proxy = tracer.create_proxy("call_function", fn, args, kwargs)
        if fn in tracer.effect_functions:
            proxy.node.meta["seqgen_impure"] = True  # a check: kept although nothing reads its result
        return tracer.leaf_result(proxy)

    return wrapper


class _LeafClassMeta(type):
    """The type of a stand-in for a leaf class in model code's globals: calling it adds a node to the graph."""

    seqgen_class: type
    seqgen_fresh: bool
    seqgen_tracer: SeqgenTracer

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls.seqgen_class)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, cls.seqgen_class)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.seqgen_tracer.create_instance(cls.seqgen_class, cls.seqgen_fresh, args, kwargs)

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls.seqgen_class, name)


class LeafPatches:
    """Stand-ins for the leaf classes and leaf functions in the globals of the model's modules, active while
    tracing. A leaf function called with traced values becomes one node; its dict, tuple or list result is returned
    as a container of items, so that ``isinstance(masks, dict)`` and ``masks[layer_type]`` behave as in eager mode."""

    def __init__(
        self, modules: list, functions: list[Callable], methods: list[tuple[type, str]], tracer: SeqgenTracer
    ) -> None:
        self._patches: list[tuple[Any, str, Any, Any]] = []
        function_ids = {id(fn) for fn in functions}
        for module in modules:
            for name, value in list(vars(module).items()):
                fresh = leaf_class(value)
                if fresh is not None:
                    standin: Any = _LeafClassMeta(
                        value.__name__, (), {"seqgen_class": value, "seqgen_fresh": fresh, "seqgen_tracer": tracer}
                    )
                elif id(value) in function_ids:
                    standin = _leaf_function_wrapper(value, tracer)
                else:
                    continue
                self._patches.append((module, name, value, standin))
        registry = leaf_methods()
        for cls, name in [*registry, *methods]:
            if any(isinstance(m, cls) for m in tracer.model.modules()):
                wrapper = _leaf_method_wrapper(name, tracer, effect=(cls, name) in registry)
                self._patches.append((cls, name, cls.__dict__[name], wrapper))
        self._on = False

    def _set(self, on: bool) -> None:
        self._on = on
        for owner, name, original, standin in self._patches:
            setattr(owner, name, standin if on else original)

    @contextlib.contextmanager
    def _state(self, on: bool) -> Iterator[None]:
        before = self._on
        self._set(on)
        try:
            yield
        finally:
            self._set(before)

    def active(self) -> contextlib.AbstractContextManager[None]:
        return self._state(True)

    def reverted(self) -> contextlib.AbstractContextManager[None]:
        """Real classes while concrete values are computed (module code run on meta may build a cache)."""
        return self._state(False)


# torch functions that build tensors or type info from sizes and dtypes: called with traced arguments they become
# graph nodes (torch.fx only intercepts functions that take a tensor)
_FACTORY_FUNCTIONS = ("arange", "empty", "eye", "finfo", "full", "iinfo", "ones", "rand", "randn", "tensor", "zeros")


@contextlib.contextmanager
def _proxy_aware_torch_functions(tracer: SeqgenTracer) -> Iterator[None]:
    originals = {name: getattr(torch, name) for name in _FACTORY_FUNCTIONS}

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _has_proxy((args, kwargs)):
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        return wrapper

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


_Journal = list[tuple[torch.nn.Module, str, bool, Any]]


@contextlib.contextmanager
def module_state_journal(record: Callable[[torch.nn.Module, str, Any], bool] = lambda *_: True) -> Iterator[None]:
    """Module attributes set inside, those for which ``record(module, name, value)`` is true, get their old values
    back (or are deleted) on exit, newest first. ``record`` may also refuse a value by raising."""
    original = torch.nn.Module.__setattr__
    journal: _Journal = []

    def recording_setattr(module: torch.nn.Module, name: str, value: Any) -> None:
        if record(module, name, value):
            had = name in module.__dict__ or name in module._buffers or name in module._parameters
            journal.append((module, name, had, real_attribute(module, name) if had else None))
        original(module, name, value)

    torch.nn.Module.__setattr__ = recording_setattr  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.__setattr__ = original  # type: ignore[method-assign]
        for module, name, had, old in reversed(journal):
            if had:
                original(module, name, old)
            elif hasattr(module, name):
                delattr(module, name)


def _traced_state_check(tracer: SeqgenTracer) -> Callable[[torch.nn.Module, str, Any], bool]:
    """Model code that stores a traced value on a module. On a module whose forward is traced (ctrl caches its
    position table moved to the input's device) later reads see the value and are recorded like any other, and the
    attribute gets its old value back after tracing. On any other module (recurrent state set up for a layer) the
    value would be read by code that runs untraced, which the generated code cannot feed: that is refused."""

    def record(module: torch.nn.Module, name: str, value: Any) -> bool:
        if not _has_proxy(value):
            return False
        if not tracer.is_traced_through(module):
            loc, code = model_line()
            raise TraceFailure(
                f"{type(module).__name__} stores a traced value as its attribute `{name}` ({short_where(loc)}: "
                f"`{code}`) for code that is not traced to read later; the generated code cannot set that state. "
                "Make that module a target with --targets, or call the function that sets it as a leaf with "
                "--ignore NAME."
            )
        return True

    return record


@contextlib.contextmanager
def tracing_patches(tracer: SeqgenTracer) -> Iterator[None]:
    """Every global patch of tracing, undone on exit: torch factory functions, leaf stand-ins, the module journal."""
    with (
        _proxy_aware_torch_functions(tracer),
        tracer.leaf_patches.active(),
        module_state_journal(_traced_state_check(tracer)),
    ):
        yield
