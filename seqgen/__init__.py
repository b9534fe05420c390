"""seqgen: trace a transformers model once, emit reviewable subgraph code, calibrate it layer by layer.

>>> import seqgen
>>> seqgen.emit("smollm2-135m", "out/smollm2")          # trace on meta, write out/smollm2/
>>> pkg = seqgen.load("out/smollm2")                     # verify hashes, import the files; no tracing
>>> logits = pkg.run(model, input_ids=ids, attention_mask=mask)["logits"]

The names below torch is needed for are imported on first use (PEP 562), so that ``import seqgen`` and
``seqgen --help`` stay light: loading a package never imports the emitter, and the CLI imports torch only in a
command that runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    EmitFailure,
    FingerprintMismatch,
    GuardError,
    IntegrityError,
    PackageError,
    SeqgenError,
    TraceFailure,
)
from .version import __version__

if TYPE_CHECKING:
    from .emitter import EmitOptions, EmitResult, emit
    from .package import Package, Subgraph, accept, load

__all__ = [
    "__version__",
    "emit",
    "EmitOptions",
    "EmitResult",
    "load",
    "accept",
    "Package",
    "Subgraph",
    "SeqgenError",
    "TraceFailure",
    "EmitFailure",
    "PackageError",
    "IntegrityError",
    "FingerprintMismatch",
    "GuardError",
]

# public name -> the submodule that defines it (each imports torch)
_LAZY = {
    "emit": "emitter",
    "EmitOptions": "emitter",
    "EmitResult": "emitter",
    "load": "package",
    "accept": "package",
    "Package": "package",
    "Subgraph": "package",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'seqgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
