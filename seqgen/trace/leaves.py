"""The one registry of functions (and classes) that are never traced into.

A leaf function becomes a single ``call_function`` node: the generated code imports it from its own module and
calls it at run time with real tensors. Mask builders are leaves by default because they branch on tensor
*contents* (padding, packed sequences) and on the attention implementation, which tracing cannot and must not
freeze. Users add more with ``--ignore NAME``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from collections.abc import Callable, Iterable

import torch

from ..errors import TraceFailure

__all__ = [
    "CACHE_NUMERICS",
    "LEAF_MODULES",
    "LEAF_FUNCTIONS",
    "LEAF_CLASSES",
    "LEAF_METHODS",
    "default_leaf_functions",
    "effect_functions",
    "leaf_class",
    "leaf_methods",
    "modules_to_patch",
    "resolve_leaf_functions",
    "resolve_leaf_methods",
]

# Python modules whose every function is a leaf. Keep this list short and say why for each entry.
LEAF_MODULES: tuple[str, ...] = (
    # attention-mask creation: data-dependent (padding detection) and implementation-dependent (sdpa/eager/flex)
    "transformers.masking_utils",
)


# Single functions that are leaves, and why. They are called for their effect: the generated code keeps the call even
# where nothing reads its result.
LEAF_FUNCTIONS: dict[str, str] = {
    "transformers.utils.import_utils.torch_compilable_check": (
        "a check of tensor contents (image placeholder tokens against image features) that raises on a bad batch: "
        "it runs on every batch, as in eager mode"
    ),
}

# Classes whose instances the traced code creates and hands to layers: constructing one becomes a graph node (so the
# generated code builds it too) instead of a Python object frozen into the trace. Value: True when each subgraph must
# build its own, empty instance. Besides these, every subclass of transformers' ``Cache`` (a KV cache) is a leaf class
# built anew in each subgraph: a layer only writes its own slot, so a fresh empty cache gives the same result, and
# re-running a subgraph (calibration) stays idempotent. Keep this list short and say why for each entry.
LEAF_CLASSES: dict[str, bool] = {
    # layers that share keys/values (gemma3n, gemma4) pass them to later layers through this dict: one instance,
    # built in the head subgraph and handed to every layer
    "transformers.cache_utils.KVSharingDict": False,
    # the same dict before transformers 5.2x: a plain UserDict, created in the model's forward
    "collections.UserDict": False,
}


# Methods of traced (ancestor) modules that are called as a whole: the generated code calls ``module.method(...)``.
LEAF_METHODS: dict[str, str] = {
    "transformers.models.rwkv.modeling_rwkv.RwkvModel._rescale_layers": (
        "rescales weights in place once for inference and records that in a flag of the model; traced, the in-place "
        "divisions would be repeated on every run"
    ),
}


def leaf_methods() -> list[tuple[type, str]]:
    """The (class, method name) pairs of :data:`LEAF_METHODS` whose modules are importable."""
    found = []
    for dotted in LEAF_METHODS:
        module_name, class_name, method = dotted.rsplit(".", 2)
        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and callable(getattr(cls, method, None)):
            found.append((cls, method))
    return found


def _model_method(model: torch.nn.Module, name: str) -> tuple[type, str] | None:
    """``Class.method`` of a class of the model's modules (or a base class), or None."""
    class_name, _, method = name.rpartition(".")
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls.__name__ == class_name.rpartition(".")[2] and inspect.isfunction(cls.__dict__.get(method)):
                return cls, method
    return None


def resolve_leaf_methods(model: torch.nn.Module, ignore: Iterable[str]) -> list[tuple[type, str]]:
    """The ``--ignore Class.method`` names that are methods of the model's classes (the generated code calls
    ``module.method(...)`` instead of tracing into it)."""
    found = []
    for name in ignore:
        method = _model_method(model, name) if "." in name else None
        if method is not None:
            found.append(method)
    return found


def _import(dotted: str) -> object | None:
    module_name, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return None


def leaf_class(value: object) -> bool | None:
    """Whether ``value`` is a leaf class built anew in each subgraph (True), built once (False), or no leaf class."""
    if not isinstance(value, type):
        return None
    for dotted, fresh in LEAF_CLASSES.items():
        if _import(dotted) is value:
            return fresh
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return True if issubclass(value, Cache) else None


def effect_functions() -> list[Callable]:
    """The leaf functions of :data:`LEAF_FUNCTIONS` (called for their effect)."""
    return [fn for fn in map(_import, LEAF_FUNCTIONS) if callable(fn)]


def _functions_of(module: types.ModuleType) -> list[Callable]:
    return [
        obj for _, obj in sorted(vars(module).items()) if inspect.isfunction(obj) and obj.__module__ == module.__name__
    ]


def default_leaf_functions() -> list[Callable]:
    found: list[Callable] = []
    for name in LEAF_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        found.extend(_functions_of(module))
    return found + effect_functions()


def modules_to_patch(model: torch.nn.Module) -> list[types.ModuleType]:
    """Python modules whose globals may hold a leaf function called by a traced forward.

    torch.fx patches leaf functions where the traced code looks them up: in the globals of each forward. transformers
    wraps forwards in decorators that live elsewhere, so the modules that define the model's classes are added here.
    """
    names: set[str] = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls.__module__.startswith("transformers.models.") or not cls.__module__.startswith(
                ("torch", "builtins")
            ):
                names.add(cls.__module__)
    names.add("transformers.modeling_utils")
    return [sys.modules[n] for n in sorted(names) if n in sys.modules]


def resolve_leaf_functions(model: torch.nn.Module, ignore: Iterable[str]) -> list[Callable]:
    """Default leaves plus the user's ``--ignore`` names.

    A name is either dotted (``pkg.module.function``) or a bare function name, looked up in the modules that define
    the model's classes. ``Class.method`` names a method of one of the model's classes (see
    :func:`resolve_leaf_methods`). Unknown names are an error, not a silent no-op.
    """
    leaves = default_leaf_functions()
    patchable = modules_to_patch(model)
    for name in ignore:
        if "." in name and _model_method(model, name) is not None:
            continue
        fn = None
        if "." in name:
            module_name, _, attr = name.rpartition(".")
            try:
                fn = getattr(importlib.import_module(module_name), attr, None)
            except ImportError:
                fn = None
        else:
            for module in patchable:
                candidate = getattr(module, name, None)
                if callable(candidate) and not isinstance(candidate, type):
                    fn = candidate
                    break
        if fn is None or not callable(fn):
            searched = ", ".join(m.__name__ for m in patchable)
            raise TraceFailure(
                f"--ignore {name!r}: no function of that name was found (searched {searched}). "
                "Give a dotted path such as 'transformers.models.x.modeling_x.helper', a function that the "
                "model's modeling code calls by name, or a method as 'Class.method'."
            )
        leaves.append(fn)
    return leaves


# Model types traced with their own cache (see ``trace_model``), because only a cached trace equals eager mode to the
# last bit: their attention concatenates keys and values into the cache and reads them back (gpt_neo, git,
# bigbird_pegasus; gptj before transformers 5.2x), or their SSM layers take another kernel path when a cache exists
# (the mamba family).
CACHE_NUMERICS: frozenset[str] = frozenset(
    {"gpt_neo", "git", "bigbird_pegasus", "gptj", "mamba", "mamba2", "falcon_mamba"}
)
