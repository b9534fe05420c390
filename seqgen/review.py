"""Packages read as text, for review: what ``seqgen show`` and ``seqgen diff`` report.

Nothing here imports a package's code: the index is parsed and verified, and every file it lists is read as text and
hashed, so a reviewer sees edited and missing files without running them. Subgraphs whose code is the same up to the
index of the layer they run are grouped, so that a reviewer reads one decoder layer and the odd ones out.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PackageError
from .index import INDEX_NAME, fingerprint_fields, package_file, parse_index, sha256_bytes

__all__ = ["PackageText", "PackageDiff", "SubgraphGroup", "read_package", "diff_packages", "group_subgraphs"]


@dataclass(frozen=True)
class PackageText:
    """A package as text: its verified index and the text of every file the index lists."""

    path: Path
    index: dict[str, Any]
    files: dict[str, str]  # file name -> text, for the files that exist
    missing: tuple[str, ...]  # files the index lists that are not there
    edited: tuple[str, ...]  # files whose sha256 is not the index's (hand edits not yet accepted)


def read_package(path: str | os.PathLike[str]) -> PackageText:
    """Read the package at ``path`` without importing any of it."""
    root = Path(path)
    index_file = root / INDEX_NAME
    if not index_file.is_file():
        raise PackageError(f"{root} is not a seqgen package (no {INDEX_NAME}); emit one with `seqgen emit MODEL OUT`.")
    index = parse_index(index_file.read_text(encoding="utf-8"), str(index_file))
    expected = {entry["file"]: entry["sha256"] for entry in index["subgraphs"]}
    if "init_sha256" in index:
        expected["__init__.py"] = index["init_sha256"]
    files: dict[str, str] = {}
    missing, edited = [], []
    for name, digest in expected.items():
        file = package_file(root, name)
        if not file.is_file():
            missing.append(name)
            continue
        data = file.read_bytes()
        files[name] = data.decode("utf-8", errors="replace")
        if sha256_bytes(data) != digest:
            edited.append(name)
    return PackageText(root, index, files, tuple(missing), tuple(edited))


@dataclass(frozen=True)
class SubgraphGroup:
    """Consecutive subgraphs (``first`` to ``last``, as indices into the index's list) with one body."""

    first: int
    last: int
    names: tuple[str, ...]
    targets: tuple[str, ...]

    def label(self) -> str:
        names = self.names[0] if len(self.names) == 1 else f"{self.names[0]}-{self.names[-1].rsplit('_', 1)[-1]}"
        return f"{names}: {_targets_range(self.targets)}" + (", one body" if len(self.names) > 1 else "")


def group_subgraphs(package: PackageText) -> list[SubgraphGroup]:
    """The package's subgraphs in order, runs of consecutive ones whose code differs only in the layer indices of
    their targets grouped together (a missing file is a group of its own)."""
    groups: list[SubgraphGroup] = []
    previous: str | None = None
    for position, entry in enumerate(package.index["subgraphs"]):
        text = package.files.get(entry["file"])
        body = None if text is None or not entry["targets"] else _layer_body(text, entry["targets"])
        if groups and body is not None and body == previous:
            last = groups[-1]
            groups[-1] = SubgraphGroup(
                last.first, position, (*last.names, entry["name"]), (*last.targets, *entry["targets"])
            )
        else:
            groups.append(SubgraphGroup(position, position, (entry["name"],), tuple(entry["targets"])))
        previous = body
    return groups


def _layer_body(text: str, targets: list[str]) -> str:
    """The code with its header comments dropped and the layer indices of ``targets`` replaced by ``#``, where they
    stand as an index (``layers[14]``) or a name part (``model.layers.14``)."""
    lines = text.splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    body = "\n".join(lines)
    for number in sorted({n for target in targets for n in re.findall(r"(?<=\.)\d+(?=\.|$)", target)}, key=len):
        body = re.sub(rf"(?<=[\[.]){number}(?=[\].'\"]|\b)", "#", body)
    return body


def _targets_range(targets: tuple[str, ...]) -> str:
    """``model.layers.0-29`` for consecutive numbered targets under one parent, else the names joined."""
    if not targets:
        return "(no targets)"
    parts = [target.rpartition(".") for target in targets]
    parents = {parent for parent, _, _ in parts}
    numbers = [int(last) for _, _, last in parts if last.isdigit()]
    if len(targets) > 1 and len(parents) == 1 and len(numbers) == len(targets):
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return f"{parts[0][0]}.{numbers[0]}-{numbers[-1]}"
    return ", ".join(targets)


@dataclass(frozen=True)
class PackageDiff:
    """What differs between two packages: fingerprint fields, subgraphs, and the text of changed files."""

    fields: tuple[tuple[str, Any, Any], ...]  # (dotted field, value in a, value in b)
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    patches: tuple[str, ...]  # one unified diff per changed file

    @property
    def same(self) -> bool:
        return not (self.fields or self.added or self.removed or self.changed)


def diff_packages(a: PackageText, b: PackageText, labels: tuple[str, str] = ("a", "b")) -> PackageDiff:
    """Compare two packages as text: fingerprint fields, subgraphs by name, file by file."""
    ours, theirs = _flatten(fingerprint_fields(a.index)), _flatten(fingerprint_fields(b.index))
    fields = tuple(
        (key, ours.get(key), theirs.get(key))
        for key in sorted(ours.keys() | theirs.keys())
        if ours.get(key) != theirs.get(key)
    )
    names_a = {entry["name"]: entry["file"] for entry in a.index["subgraphs"]}
    names_b = {entry["name"]: entry["file"] for entry in b.index["subgraphs"]}
    files = ["__init__.py"] + [names_a[name] for name in names_a if name in names_b]
    changed, patches = [], []
    for file in files:
        text_a, text_b = a.files.get(file, ""), b.files.get(file, "")
        if text_a != text_b:
            changed.append(file)
            patches.append(_unified(text_a, text_b, f"{labels[0]}/{file}", f"{labels[1]}/{file}"))
    return PackageDiff(
        fields,
        tuple(name for name in names_b if name not in names_a),
        tuple(name for name in names_a if name not in names_b),
        tuple(changed),
        tuple(patches),
    )


def _unified(a: str, b: str, label_a: str, label_b: str) -> str:
    lines = difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True), label_a, label_b)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b": value}``; lists stay whole."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    return dict(_items(value, prefix))


def _items(value: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, Mapping) and item:
            yield from _items(item, name)
        else:
            yield name, item
