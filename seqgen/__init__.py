"""seqgen: trace a transformers model once, emit reviewable subgraph code, calibrate it layer by layer.

>>> import seqgen
>>> seqgen.emit("smollm2-135m", "out/smollm2")          # trace on meta, write out/smollm2/
>>> pkg = seqgen.load("out/smollm2")                     # verify hashes, import the files; no tracing
>>> logits = pkg.run(model, input_ids=ids, attention_mask=mask)["logits"]
"""

from __future__ import annotations

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
from .package import Package, Subgraph, accept, load
from .version import __version__

if TYPE_CHECKING:
    from .emitter import EmitOptions, EmitResult

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


def __getattr__(name: str) -> Any:
    # The emitter (tracer, black, jinja2) is imported on first use: loading a package never imports it.
    if name in ("emit", "EmitOptions", "EmitResult"):
        from . import emitter as emit_module

        return getattr(emit_module, name)
    raise AttributeError(f"module 'seqgen' has no attribute {name!r}")
