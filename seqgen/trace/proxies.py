"""Proxies and meta evaluation.

The tracer's proxies answer the Python protocol methods that need a concrete value (``len``, ``int``, indexing) from
the value computed on the meta device, which the tracer guards. A leaf-class instance's proxy passes ``isinstance``.
Meta evaluation runs modules and leaf functions on meta values with the sample's shapes.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch.fx.node import Node
from torch.fx.proxy import Attribute, Proxy

if TYPE_CHECKING:
    from .tracer import SeqgenTracer

__all__ = ["InstanceProxy", "SeqgenAttribute", "SeqgenProxy", "real_attribute", "run_leaf_function"]
__all__ += ["weights_on_meta"]


class _ProxyMixin:
    """Python protocol methods that need a concrete value: resolved from meta values and guarded."""

    tracer: SeqgenTracer

    def __len__(self) -> int:
        return self.tracer.concrete_len(self)  # type: ignore[arg-type]

    def __index__(self) -> int:
        return self.tracer.concrete_int(self)  # type: ignore[arg-type]

    def __int__(self) -> int:
        return self.tracer.concrete_int(self)  # type: ignore[arg-type]

    def __format__(self, spec: str) -> str:  # a traced value in an f-string message: known only at run time
        return "<traced value>"

    def __setitem__(self, key: Any, value: Any) -> None:  # in-place update: a statement in the generated code
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __getattr__(self, k: str) -> Attribute:
        node = self.node if isinstance(self, Proxy) and not isinstance(self, Attribute) else None
        if node is not None and node.op == "get_attr" and not k.startswith("__"):
            owner = real_attribute(self.tracer.root, str(node.target))
            if not hasattr(owner, k):  # hasattr(weight, "SCB") must be False, as it is for the real parameter
                raise AttributeError(f"{type(owner).__name__} {node.target} has no attribute {k!r}")
        return SeqgenAttribute(self, k)  # type: ignore[arg-type]


def real_attribute(root: torch.nn.Module, dotted: str) -> Any:
    """The object at ``dotted`` under ``root``, read past torch.fx's patched ``Module.__getattr__``."""
    obj: Any = root
    for part in dotted.split("."):
        if isinstance(obj, torch.nn.Module):
            for store in ("_parameters", "_buffers", "_modules"):
                members = obj.__dict__.get(store, {})
                if part in members:
                    obj = members[part]
                    break
            else:
                obj = object.__getattribute__(obj, part)
        else:
            obj = getattr(obj, part)
    return obj


class SeqgenProxy(_ProxyMixin, Proxy):
    pass


class SeqgenAttribute(_ProxyMixin, Attribute):
    pass


class InstanceProxy(SeqgenProxy):
    """The proxy of a leaf-class instance (a KV cache): ``isinstance`` sees the class, so branches stay right."""

    def __init__(self, node: Node, tracer: SeqgenTracer, cls: type) -> None:
        super().__init__(node, tracer)
        object.__setattr__(self, "_seqgen_class", cls)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - isinstance() falls back to __class__
        return object.__getattribute__(self, "_seqgen_class")


@contextlib.contextmanager
def weights_on_meta(module: torch.nn.Module) -> Iterator[None]:
    """Meta stand-ins for weights that are not on meta (legacy ``nn.Parameter(torch.FloatTensor(n))`` ignores the
    meta device a model is built on), for as long as the module runs on meta values."""
    swapped: list[tuple[dict, str, Any]] = []
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None and not tensor.is_meta:
                    swapped.append((store, name, tensor))
                    meta = torch.empty_like(tensor, device="meta")
                    store[name] = torch.nn.Parameter(meta, tensor.requires_grad) if store is sub._parameters else meta
    try:
        yield
    finally:
        for store, name, tensor in swapped:
            store[name] = tensor


def run_leaf_function(fn: Callable, args: Any, kwargs: Any) -> Any:
    """Run a leaf function on meta values; one that reads tensor contents (a mask builder checking for padding) runs
    on CPU tensors of the same shapes (integers 1, floats 0) and its result goes back to meta. Only its shapes are
    used: decisions taken from them are guarded like any other."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        error = exc

    def to_meta(a: Any) -> Any:
        return a.to("meta") if isinstance(a, torch.Tensor) else a

    # integer inputs all ones (tokens, no padding); all zeros; or masks of ones and zeros elsewhere (an unpadded
    # text-only batch: no image placeholder tokens)
    for ints, mask_ints in ((1, 1), (0, 0), (0, 1)):

        def to_cpu(a: Any, fill: int) -> Any:
            if isinstance(a, torch.Tensor) and a.is_meta:
                fill = 0 if a.is_floating_point() or a.is_complex() else fill
                return torch.full(a.shape, fill, dtype=a.dtype, device="cpu")
            return a

        cpu_args = torch.fx.node.map_aggregate(args, lambda a: to_cpu(a, ints))
        cpu_kwargs = {
            k: torch.fx.node.map_aggregate(v, lambda a, k=k: to_cpu(a, mask_ints if "mask" in k else ints))
            for k, v in kwargs.items()
        }
        try:
            with torch.device("cpu"):
                result = fn(*cpu_args, **cpu_kwargs)
        except Exception:
            continue
        return torch.utils._pytree.tree_map(to_meta, result)
    raise error
