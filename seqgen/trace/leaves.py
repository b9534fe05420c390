"""The one registry of functions that are never traced into.

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

__all__ = ["default_leaf_functions", "resolve_leaf_functions", "modules_to_patch"]

# Python modules whose every function is a leaf. Keep this list short and say why for each entry.
LEAF_MODULES: tuple[str, ...] = (
    # attention-mask creation: data-dependent (padding detection) and implementation-dependent (sdpa/eager/flex)
    "transformers.masking_utils",
)


def _functions_of(module: types.ModuleType) -> list[Callable]:
    return [
        obj
        for _, obj in sorted(vars(module).items())
        if inspect.isfunction(obj) and obj.__module__ == module.__name__
    ]


def default_leaf_functions() -> list[Callable]:
    found: list[Callable] = []
    for name in LEAF_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        found.extend(_functions_of(module))
    return found


def modules_to_patch(model: torch.nn.Module) -> list[types.ModuleType]:
    """Python modules whose globals may hold a leaf function called by a traced forward.

    torch.fx patches leaf functions where the traced code looks them up: in the globals of each forward. transformers
    wraps forwards in decorators that live elsewhere, so the modules that define the model's classes are added here.
    """
    names: set[str] = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls.__module__.startswith("transformers.models.") or not cls.__module__.startswith(("torch", "builtins")):
                names.add(cls.__module__)
    names.add("transformers.modeling_utils")
    return [sys.modules[n] for n in sorted(names) if n in sys.modules]


def resolve_leaf_functions(model: torch.nn.Module, ignore: Iterable[str]) -> list[Callable]:
    """Default leaves plus the user's ``--ignore`` names.

    A name is either dotted (``pkg.module.function``) or a bare function name, looked up in the modules that define
    the model's classes. Unknown names are an error, not a silent no-op.
    """
    leaves = default_leaf_functions()
    patchable = modules_to_patch(model)
    for name in ignore:
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
                "Give a dotted path such as 'transformers.models.x.modeling_x.helper', or a function that the "
                "model's modeling code calls by name."
            )
        leaves.append(fn)
    return leaves
