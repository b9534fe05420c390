"""``index.json``: the runtime's single source of truth about a package, and the fingerprint that names it.

Fingerprint fields (a change in any of them means the graph may differ, so the package must be re-emitted):

=====================  ==================================================================================
``model_class``        the traced class, e.g. ``LlamaForCausalLM``
``config``             sha256 of the config as a dict, without fields that cannot change the graph
                       (``_name_or_path``, ``transformers_version``, ``architectures``, ...)
``source``             sha256 of each Python module that defines a class of the model or a leaf function:
                       an edit to modeling code or to a mask builder changes it
``versions``           seqgen, torch and transformers versions
``options``            targets, ``--targets-per-subgraph`` and ``--ignore``
``inputs``             the sample's input names, dtypes and ranks (sizes are covered by guards)
``schema_version``     the index layout: a package of another layout is never reused (the partition cache
                       keys packages by the digest)
=====================  ==================================================================================

A package emitted from a snapshot in huggingface_hub's cache also records ``hub``: the model id and the commit it
resolved to (shown by ``seqgen show``, compared by ``seqgen diff``). It is not digested: the same config and code at
another commit is the same package, and the partition cache keeps the one emitted first.

Each fact is stored once. ``model_class``, ``versions``, ``options`` (with the sample's ``sample_shape``, which is
not fingerprinted) and ``inputs`` (with shapes; the fingerprint takes their ranks) are top-level fields;
``fingerprint`` holds the ``config`` and ``source`` hashes and the ``digest`` over all fields, which
:func:`fingerprint_fields` reassembles from the index. Each subgraph's ``inputs`` maps a value's name to the subgraph
that produced it (``"model input"`` for the package's own inputs).

The index protects itself: ``digest`` is the sha256 of the canonical JSON of every other field, and the file must
equal its canonical form byte for byte, so any changed byte (hashes included) is detected. This guards against
accidents and unreviewed edits, not against someone who recomputes the digest on purpose.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import IntegrityError, PackageError
from .hub import snapshot_origin

__all__ = [
    "InputSpec",
    "SCHEMA_VERSION",
    "INDEX_NAME",
    "config_fields",
    "compute_fingerprint",
    "current_versions",
    "fingerprint_fields",
    "input_signature",
    "package_file",
    "MODEL_INPUT",
    "UNFINGERPRINTED_OPTIONS",
    "dump_index",
    "parse_index",
    "sha256_bytes",
]

SCHEMA_VERSION = 2  # 2: each fact stored once; subgraph inputs name their producers
INDEX_NAME = "index.json"
MODEL_INPUT = "model input"  # the producer of a package input
UNFINGERPRINTED_OPTIONS = ("sample_shape",)  # options that cannot change the graph (sizes are guarded)

# config fields that name or date a checkpoint but cannot change the traced graph
_CONFIG_IGNORED = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "architectures",
        "_commit_hash",
        "auto_map",
        "quantization_config",
        "torch_dtype",
        "dtype",
        "_attn_implementation_autoset",
    }
)


@dataclass(frozen=True)
class InputSpec:
    """One model input of the sample: its name, dtype and shape (the rank is part of the fingerprint)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def meta_tensor(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=getattr(torch, self.dtype), device="meta")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_fields(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    return {k: v for k, v in sorted(data.items()) if k not in _CONFIG_IGNORED}


def current_versions() -> dict[str, str]:
    import transformers

    from .version import __version__

    return {"seqgen": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def _source_hashes(model: torch.nn.Module, extra_modules: Iterable[str]) -> dict[str, str]:
    """The sha256 of the source of every module that defines the model's classes, and of ``extra_modules``. A model's
    own code (``trust_remote_code``: modules that transformers imports as ``transformers_modules.<repo>.<file>``)
    counts whole: every module of its repository that is imported, its configuration among them."""
    names: set[str] = set(extra_modules)
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls.__module__ not in ("builtins",) and not cls.__module__.startswith("torch."):
                names.add(cls.__module__)
    remote = {name.rpartition(".")[0] for name in names if name.startswith("transformers_modules.")}
    names.update(name for name in list(sys.modules) if name.rpartition(".")[0] in remote)
    hashes: dict[str, str] = {}
    for name in sorted(names):
        module = sys.modules.get(name)
        try:
            path = inspect.getsourcefile(module) if module is not None else None
        except TypeError:
            path = None
        if path:
            with open(path, "rb") as f:
                hashes[name] = sha256_bytes(f.read())
    return hashes


def compute_fingerprint(
    model: torch.nn.Module,
    *,
    options: dict[str, Any],
    inputs: list[dict[str, Any]],
    source_modules: Iterable[str] = (),
) -> dict[str, Any]:
    """The fingerprint fields and their digest (the cache key).

    ``inputs`` are ``{"name", "dtype", "rank"}`` records; ``source_modules`` names Python modules to hash beyond
    those that define the model's classes (the leaf functions' modules).
    """
    fields = {
        "model_class": type(model).__name__,
        "config": sha256_bytes(_canonical(config_fields(model.config)).encode()),
        "source": _source_hashes(model, source_modules),
        "versions": current_versions(),
        "options": options,
        "inputs": inputs,
        "schema_version": SCHEMA_VERSION,
    }
    digest = sha256_bytes(_canonical(fields).encode())
    origin = snapshot_origin(getattr(model.config, "name_or_path", "") or "")
    if origin is not None:  # recorded, not digested: the same config and code at another commit is the same package
        fields["hub"] = origin
    return {"digest": digest, "fields": fields}


def input_signature(inputs: Iterable[InputSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": s.dtype, "rank": len(s.shape)} for s in inputs]


def fingerprint_fields(index: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint fields of a package, reassembled from the index's top-level facts and its two hashes."""
    return {
        "model_class": index["model_class"],
        "config": index["fingerprint"]["config"],
        "source": index["fingerprint"]["source"],
        "versions": index["versions"],
        "options": {k: v for k, v in index["options"].items() if k not in UNFINGERPRINTED_OPTIONS},
        "inputs": input_signature(InputSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in index["inputs"]),
        "schema_version": index["schema_version"],
        **({"hub": index["fingerprint"]["hub"]} if "hub" in index["fingerprint"] else {}),
    }


def package_file(root: Path, name: str) -> Path:
    """The file ``name`` that an index lists, inside the package at ``root``. A name that is absolute, holds ``..``,
    is no plain file name or resolves (through links) outside ``root`` is refused: an index names files of its own
    package only, so a forged one cannot make the loader import code from elsewhere."""
    candidate = root / name
    if (
        not isinstance(name, str)
        or Path(name).is_absolute()
        or Path(name).name != name
        or name in ("", ".", "..")
        or not candidate.resolve().is_relative_to(root.resolve())
    ):
        raise PackageError(
            f"{root / INDEX_NAME} lists the file {name!r}, which is not a file of the package directory; an index "
            "names only files beside it. Re-emit the package with `seqgen emit MODEL OUT --force`."
        )
    return candidate


def _serialize(index: dict[str, Any]) -> str:
    return json.dumps(index, indent=2, sort_keys=False) + "\n"


def dump_index(index: dict[str, Any]) -> str:
    """Index text with its own ``digest`` as the last field."""
    body = {k: v for k, v in index.items() if k != "digest"}
    body["digest"] = sha256_bytes(_canonical(body).encode())
    return _serialize(body)


def parse_index(text: str, where: str) -> dict[str, Any]:
    """Parse and verify an index; raise naming the file on any inconsistency."""
    try:
        index = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IntegrityError(
            f"{where} is not valid JSON ({exc}); re-emit the package with `seqgen emit --force`."
        ) from None
    if not isinstance(index, dict) or "schema_version" not in index:
        raise PackageError(f"{where} is not a seqgen index (no schema_version).")
    if index["schema_version"] != SCHEMA_VERSION:
        raise PackageError(
            f"{where} has schema_version {index['schema_version']!r}, written by another seqgen; this one reads "
            f"schema_version {SCHEMA_VERSION}. Re-emit the package with this seqgen (`seqgen emit MODEL OUT --force`)."
        )
    expected = dump_index(index)
    if index.get("digest") is None or expected != text:
        raise IntegrityError(
            f"{where} was modified after it was written (its digest or layout does not match its content). "
            "Hand edits to the index are not supported: edit the subgraph files and run `seqgen accept PACKAGE`, "
            "or re-emit with `seqgen emit MODEL OUT --force`."
        )
    return index
