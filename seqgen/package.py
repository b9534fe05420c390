"""The loaded, verified view of a package directory. No tracing, no ``exec`` of strings, no pickles.

``load(path)`` reads ``index.json`` (which verifies its own digest), checks the sha256 of every subgraph file, and
imports each file with the standard import machinery, so tracebacks point at ``subgraph_007.py:23``. A file whose
hash differs is refused unless the edit was accepted with ``seqgen accept`` (:func:`accept`).
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import sys
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .errors import FingerprintMismatch, IntegrityError, PackageError, SeqgenError
from .index import (
    INDEX_NAME,
    compute_fingerprint,
    dump_index,
    fingerprint_fields,
    package_file,
    parse_index,
    sha256_bytes,
)

__all__ = ["Subgraph", "Package", "load", "accept", "HEADER_CONSTANTS"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subgraph:
    """One generated file: what it reads, returns and frees, and which modules it runs."""

    index: int
    name: str
    file: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    consumed: tuple[str, ...]
    targets: tuple[str, ...]
    modules: tuple[str, ...]
    tensors: tuple[str, ...]
    guards: tuple[int, ...]
    forward: Callable[..., dict[str, Any]]

    def __call__(self, model: torch.nn.Module, values: MutableMapping[str, Any]) -> dict[str, Any]:
        """Run on the intermediates ``values``: drop what this subgraph consumes, add what it returns."""
        kwargs = {name: values[name] for name in self.inputs}
        for name in self.consumed:
            del values[name]
        outputs = self.forward(model, **kwargs)
        values.update(outputs)
        return outputs


@dataclass(frozen=True)
class Package:
    path: Path
    index: dict[str, Any]
    subgraphs: tuple[Subgraph, ...]
    _checked_models: weakref.WeakSet[torch.nn.Module] = field(
        default_factory=weakref.WeakSet, repr=False, compare=False
    )

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]["digest"]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec["name"] for spec in self.index["inputs"])

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.index["outputs"])

    @property
    def edited_files(self) -> tuple[str, ...]:
        return tuple(sorted(self.index.get("edited", {})))

    def check_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch's values for the package inputs; errors name any missing input or wrong rank or dtype."""
        values: dict[str, Any] = {}
        for spec in self.index["inputs"]:
            name = spec["name"]
            if name not in batch or batch[name] is None:
                raise SeqgenError(
                    f"batch lacks {name!r}, which package {self.path} was emitted with "
                    f"(inputs: {', '.join(self.input_names)}). Pass it, or re-emit for the inputs you have."
                )
            value = batch[name]
            if isinstance(value, torch.Tensor):
                if value.dim() != len(spec["shape"]):
                    raise SeqgenError(
                        f"input {name!r} has rank {value.dim()}, the package expects rank {len(spec['shape'])} "
                        f"(sample shape {spec['shape']})."
                    )
            values[name] = value
        unknown = sorted(set(batch) - set(values))
        if unknown:
            raise SeqgenError(
                f"batch has inputs the package was not emitted with: {', '.join(unknown)}. "
                "Drop them, or re-emit with a sample that has them."
            )
        return values

    def expected_fingerprint(self, model: torch.nn.Module) -> dict[str, Any]:
        """The fingerprint ``model`` would have under this package's options: what the package must match."""
        fields = fingerprint_fields(self.index)
        return compute_fingerprint(
            model, options=fields["options"], inputs=fields["inputs"], source_modules=list(fields["source"])
        )

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`FingerprintMismatch` unless this package was emitted for ``model`` (checked once each)."""
        if model not in self._checked_models:
            self.check_fingerprint(self.expected_fingerprint(model))
            self._checked_models.add(model)

    def run(self, model: torch.nn.Module, **batch: Any) -> dict[str, Any]:
        """Run every subgraph in order; returns the model outputs (``logits``)."""
        self.check_model(model)
        values = self.check_batch(batch)
        for subgraph in self.subgraphs:
            subgraph(model, values)
        return {name: values[name] for name in self.output_names}

    def check_fingerprint(self, expected: Mapping[str, Any]) -> None:
        """Raise :class:`FingerprintMismatch` naming each field that differs from ``expected``."""
        if expected["digest"] == self.fingerprint:
            return
        mine = fingerprint_fields(self.index)
        theirs = expected["fields"]
        differ = []
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) == theirs.get(key):
                continue
            if isinstance(mine.get(key), dict) and isinstance(theirs.get(key), dict):
                inner = sorted(k for k in set(mine[key]) | set(theirs[key]) if mine[key].get(k) != theirs[key].get(k))
                differ.append(f"{key} ({', '.join(inner)})")
            else:
                differ.append(key)
        raise FingerprintMismatch(
            f"package {self.path} was emitted for another model or setup; these fingerprint fields differ: "
            f"{'; '.join(differ)}. Re-emit it (`seqgen emit MODEL OUT --force`, or `--reemit` with calibrate)."
        )


def _import_file(module_name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - only for non-.py paths
        raise PackageError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _read_index(path: Path) -> dict[str, Any]:
    index_path = path / INDEX_NAME
    if not index_path.is_file():
        raise PackageError(f"{path} is not a seqgen package: it has no {INDEX_NAME}. Create one with `seqgen emit`.")
    return parse_index(index_path.read_text(encoding="utf-8"), str(index_path))


def _check_file(path: Path, entry_name: str, expected: str) -> None:
    if not path.is_file():
        raise IntegrityError(f"{path} is listed in the index but missing; re-emit the package.")
    actual = sha256_bytes(path.read_bytes())
    if actual != expected:
        raise IntegrityError(
            f"{path} changed since it was emitted or accepted (sha256 {actual[:12]}…, index says {expected[:12]}…). "
            f"If you reviewed the edit, run `seqgen accept {path.parent}` to trust it; otherwise re-emit the package."
        )


HEADER_CONSTANTS = ("INPUTS", "OUTPUTS", "CONSUMED", "TARGETS")  # each equals its index field, lower-cased


def _header_constants(file: Path) -> dict[str, Any]:
    """The literal module-level assignments of ``file``, read as text without importing it."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    except SyntaxError as exc:
        raise PackageError(f"{file} is not valid Python ({exc}); fix the hand edit, or re-emit the package.") from None
    found: dict[str, Any] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Name) and target.id in HEADER_CONSTANTS:
                try:
                    found[target.id] = ast.literal_eval(statement.value)
                except ValueError:
                    found[target.id] = ast.unparse(statement.value)
    return found


def _check_header(file: Path, entry: Mapping[str, Any]) -> None:
    """The file's INPUTS, OUTPUTS, CONSUMED and TARGETS must be what the index, which the runtime follows, says."""
    declared = _header_constants(file)
    for constant in HEADER_CONSTANTS:
        expected = tuple(entry[constant.lower()])
        if constant not in declared:
            raise PackageError(
                f"{file} has no {constant} constant; the index says {expected}. A hand edit removed it: restore it "
                "as emitted, or re-emit the package with `seqgen emit MODEL OUT --force`."
            )
        if declared[constant] != expected:
            raise PackageError(
                f"{file} declares {constant} = {declared[constant]!r}, but the index says {expected}; a hand edit "
                "changed the subgraph's interface. Keep the header constants as emitted, or re-emit the package "
                "with `seqgen emit MODEL OUT --force`."
            )


def load(path: str | os.PathLike[str], *, verify: bool = True) -> Package:
    """Load a package: verify the index and every file's hash, then import the subgraph files."""
    path = Path(path).resolve()
    index = _read_index(path)
    if verify:
        _check_file(path / "__init__.py", "__init__", index["init_sha256"])
    namespace = f"seqgen_packages.p{index['fingerprint']['digest'][:16]}_{sha256_bytes(str(path).encode())[:8]}"
    subgraphs = []
    for i, entry in enumerate(index["subgraphs"]):
        file = package_file(path, entry["file"])
        if verify:
            _check_file(file, entry["name"], entry["sha256"])
        _check_header(file, entry)
        module = _import_file(f"{namespace}.{entry['name']}", file)
        forward = getattr(module, "forward", None)
        if not callable(forward):
            raise PackageError(f"{file} defines no forward(model, **inputs) function.")
        subgraphs.append(
            Subgraph(
                index=i,
                name=entry["name"],
                file=file,
                inputs=tuple(entry["inputs"]),
                outputs=tuple(entry["outputs"]),
                consumed=tuple(entry["consumed"]),
                targets=tuple(entry["targets"]),
                modules=tuple(entry["modules"]),
                tensors=tuple(entry["tensors"]),
                guards=tuple(entry["guards"]),
                forward=forward,
            )
        )
    logger.debug("loaded %d subgraphs from %s", len(subgraphs), path)
    return Package(path=path, index=index, subgraphs=tuple(subgraphs))


def accept(path: str | os.PathLike[str]) -> list[str]:
    """Trust the current content of every subgraph file: re-stamp hashes, remember the originals.

    Returns the names of the files whose hash changed in this call. The index records, per edited file, the hash it
    was emitted with, so ``seqgen show`` can list edited files and a re-emit can tell them apart.
    """
    path = Path(path).resolve()
    index = _read_index(path)
    edited: dict[str, str] = dict(index.get("edited", {}))
    changed = []
    for entry in index["subgraphs"]:
        file = package_file(path, entry["file"])
        if not file.is_file():
            raise IntegrityError(f"{file} is listed in the index but missing; re-emit the package.")
        actual = sha256_bytes(file.read_bytes())
        if actual == entry["sha256"]:
            continue
        edited.setdefault(entry["file"], entry["sha256"])
        if edited[entry["file"]] == actual:  # edited back to the original
            del edited[entry["file"]]
        entry["sha256"] = actual
        changed.append(entry["file"])
    index["edited"] = dict(sorted(edited.items()))
    text = dump_index(index)
    tmp = path / f".{INDEX_NAME}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path / INDEX_NAME)
    return changed
