"""Emit: trace once, partition, write a package of black-formatted, importable subgraph files plus ``index.json``.

The package is written to a temporary sibling directory and renamed into place, so a killed emit leaves no partial
package behind. Emitting twice gives byte-identical files.
"""

from __future__ import annotations

import ast
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import black
import jinja2
import torch
from torch.fx.node import Node

from ..checkpoint import atomic_directory
from ..errors import EmitFailure, SeqgenError
from ..index import (
    INDEX_NAME,
    MODEL_INPUT,
    SCHEMA_VERSION,
    InputSpec,
    compute_fingerprint,
    current_versions,
    dump_index,
    input_signature,
    sha256_bytes,
)
from ..partition import Partition, partition_graph
from ..trace.tracer import Trace, trace_model
from ..version import __version__
from .codegen import render_partition
from .naming import assign_names

__all__ = ["EmitOptions", "EmitResult", "emit", "emit_model", "sample_inputs", "BLACK_MODE"]

logger = logging.getLogger(__name__)

# black's defaults: a package passes `black --check` wherever it is written, whatever the project around it uses
BLACK_MODE = black.Mode()
DEFAULT_SAMPLE_SHAPE = (2, 64)


@dataclass(frozen=True)
class EmitOptions:
    """What to trace and how to split it. Shared by the library call and the CLI."""

    targets: tuple[str, ...] | None = None  # class names or module-name regexes; None: the model's decoder layers
    targets_per_subgraph: int = 1
    ignore: tuple[str, ...] = ()  # functions (or Class.method) called as leaves, besides the mask builders
    sample_shape: tuple[int, int] = DEFAULT_SAMPLE_SHAPE  # (batch, sequence) of the trace-time sample
    # more sample inputs besides token ids and attention mask, e.g. InputSpec("pixel_values", "float32", (1, 3, 28, 28))
    # for a vision-language model: its vision tower and projector then run in the head subgraph
    extra_inputs: tuple[InputSpec, ...] = ()

    @classmethod
    def of_package(cls, index: dict[str, Any]) -> EmitOptions:
        """The options a package was emitted with, read from its index (to emit the same package again)."""
        options = index["options"]
        standard = {spec.name for spec in sample_inputs()}
        return cls(
            targets=tuple(options["targets"]) if options["targets"] else None,
            targets_per_subgraph=options["targets_per_subgraph"],
            ignore=tuple(options["ignore"]),
            sample_shape=tuple(options["sample_shape"]),
            extra_inputs=tuple(
                InputSpec(s["name"], s["dtype"], tuple(s["shape"]))
                for s in index["inputs"]
                if s["name"] not in standard
            ),
        )

    def inputs(self) -> list[InputSpec]:
        """The package's inputs: token ids and attention mask of ``sample_shape``, then ``extra_inputs``."""
        return sample_inputs(self.sample_shape) + list(self.extra_inputs)

    def fingerprint_fields(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets) if self.targets else None,
            "targets_per_subgraph": self.targets_per_subgraph,
            "ignore": list(self.ignore),
        }


@dataclass
class EmitResult:
    path: Path
    index: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def sample_inputs(shape: tuple[int, int] = DEFAULT_SAMPLE_SHAPE) -> list[InputSpec]:
    """The trace-time sample: token ids and an attention mask of the given (batch, sequence) shape."""
    batch, seq = shape
    return [InputSpec("input_ids", "int64", (batch, seq)), InputSpec("attention_mask", "int64", (batch, seq))]


def _templates() -> jinja2.Environment:
    try:
        import seqgen.templates as shipped  # installed: templates/ ships as seqgen.templates

        loader: jinja2.BaseLoader = jinja2.FileSystemLoader(os.path.dirname(shipped.__file__))
    except ImportError:  # a source checkout without installation
        loader = jinja2.FileSystemLoader(Path(__file__).resolve().parents[2] / "templates")
    return jinja2.Environment(
        loader=loader, trim_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )


def _tuple(names: list[str]) -> str:
    return repr(tuple(names))


def _describe(part: Partition, model: torch.nn.Module, count: int) -> str:
    if part.targets:
        classes = sorted({type(model.get_submodule(t)).__name__ for t in part.targets})
        return f"{', '.join(part.targets)} ({', '.join(classes)})"
    if part.index == 0:
        return "head: everything the first target needs (embeddings, masks, position tables)"
    return "tail: everything after the last target (final norm, lm_head)"


def _format(source: str, name: str) -> str:
    try:
        formatted = black.format_str(source, mode=BLACK_MODE)
        ast.parse(formatted, filename=name)
    except Exception as exc:  # a bug in the renderer, never the user's fault: keep the source for the report
        raise EmitFailure(f"generated {name} is not valid Python ({exc}). Please report this with:\n{source}") from exc
    return formatted


def _render_files(trace: Trace, partitions: list[Partition]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    graph = trace.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    bodies = []
    imported: set[str] = set()
    # Render once to learn the imported names, so that no value is named like an imported function.
    names = assign_names(partitions, placeholders, output, imported)
    for part in partitions:
        imported.update(render_partition(part, trace.root, names).imports.names)
    names = assign_names(partitions, placeholders, output, imported)
    bodies = [render_partition(part, trace.root, names) for part in partitions]

    env = _templates()
    ver = current_versions()
    files: dict[str, str] = {}
    entries: list[dict[str, Any]] = []
    count = len(partitions)
    producers = _producers(partitions, placeholders)
    for part, body in zip(partitions, bodies, strict=True):
        name = _subgraph_name(part.index)
        inputs = {names[n]: producers[n] for n in part.inputs}
        text = env.get_template("subgraph.py.j2").render(
            seqgen_version=ver["seqgen"],
            torch_version=ver["torch"],
            transformers_version=ver["transformers"],
            model_class=type(trace.model).__name__,
            name=name,
            count=count,
            description=_describe(part, trace.model, count),
            imports=body.imports.lines(),
            inputs=_tuple(list(inputs)),
            sources=_sources(inputs),
            outputs=_tuple([names[n] for n in part.outputs]),
            consumed=_tuple([names[n] for n in part.consumed]),
            targets=_tuple(part.targets),
            params=", ".join(inputs),
            body=body.lines,
        )
        files[f"{name}.py"] = _format(text, f"{name}.py")
        entries.append(
            {
                "name": name,
                "file": f"{name}.py",
                "inputs": inputs,
                "outputs": [names[n] for n in part.outputs],
                "consumed": [names[n] for n in part.consumed],
                "targets": part.targets,
                "modules": part.modules,
                "tensors": part.tensors,
                "guards": [n.meta["seqgen_guard"] for n in part.nodes if "seqgen_guard" in n.meta],
            }
        )
    return files, entries


def _subgraph_name(index: int) -> str:
    return f"subgraph_{index:03d}"


def _producers(partitions: list[Partition], placeholders: list[Node]) -> dict[Node, str]:
    """For each value passed between subgraphs, the subgraph that returns it first, or the model input."""
    producers = dict.fromkeys(placeholders, MODEL_INPUT)
    for part in partitions:
        for node in part.outputs:
            producers.setdefault(node, _subgraph_name(part.index))
    return producers


def _sources(inputs: dict[str, str]) -> list[str]:
    """Header lines naming where the inputs come from: ``Inputs from subgraph_000: causal_mask, position_ids.``"""
    by_producer: dict[str, list[str]] = {}
    for name, producer in inputs.items():
        by_producer.setdefault(producer, []).append(name)
    return [
        f"{'Model inputs' if producer == MODEL_INPUT else 'Inputs from ' + producer}: {', '.join(names)}."
        for producer, names in by_producer.items()
    ]


def _check_out_dir(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise SeqgenError(f"{out} exists and is not a directory; choose another OUT.")
    if not any(out.iterdir()):
        return
    if not (out / INDEX_NAME).exists():
        raise SeqgenError(
            f"{out} is not empty and is not a seqgen package (no {INDEX_NAME}); refusing to write into it. "
            "Choose an empty or new directory."
        )
    if not force:
        raise SeqgenError(f"{out} already holds a seqgen package; pass --force to replace it.")


def write_package(out: Path, files: dict[str, str], force: bool) -> None:
    """Write ``files`` as directory ``out`` atomically: a temp sibling, then a rename."""
    _check_out_dir(out, force)
    with atomic_directory(out, replace=force) as tmp:
        for name, text in sorted(files.items()):
            (tmp / name).write_text(text, encoding="utf-8")


def emit_model(
    model: torch.nn.Module, out: str | os.PathLike[str], options: EmitOptions = EmitOptions(), *, force: bool = False
) -> EmitResult:
    """Trace ``model`` (best on the meta device) and write its package to ``out``."""
    out = Path(out)
    _check_out_dir(out, force)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    inputs = options.inputs()
    trace = trace_model(
        model, inputs, targets=list(options.targets) if options.targets else None, ignore=list(options.ignore)
    )
    seconds["trace"] = time.perf_counter() - start
    partitions = partition_graph(trace.graph, trace.root, trace.targets, options.targets_per_subgraph, trace.units)
    files, entries = _render_files(trace, partitions)
    seconds["render"] = time.perf_counter() - start - seconds["trace"]

    for entry in entries:
        entry["sha256"] = sha256_bytes(files[entry["file"]].encode("utf-8"))
    env = _templates()
    files["__init__.py"] = _format(
        env.get_template("package_init.py.j2").render(
            model_class=type(model).__name__,
            seqgen_version=__version__,
            subgraphs=_tuple([e["name"] for e in entries]),
        ),
        "__init__.py",
    )
    output = next(n for n in trace.graph.nodes if n.op == "output")
    fingerprint = compute_fingerprint(
        model,
        options=options.fingerprint_fields(),
        inputs=input_signature(inputs),
        source_modules=sorted({fn.__module__ for fn in trace.leaf_functions}),
    )
    index = {
        "schema_version": SCHEMA_VERSION,
        "versions": fingerprint["fields"]["versions"],
        "model_class": fingerprint["fields"]["model_class"],
        "fingerprint": {
            "digest": fingerprint["digest"],
            "config": fingerprint["fields"]["config"],
            "source": fingerprint["fields"]["source"],
            **({"hub": fingerprint["fields"]["hub"]} if "hub" in fingerprint["fields"] else {}),
        },
        "options": {**options.fingerprint_fields(), "sample_shape": list(options.sample_shape)},
        "inputs": [asdict(spec) | {"shape": list(spec.shape)} for spec in inputs],
        "outputs": list(output.args[0].keys()),
        "guards": [asdict(g) for g in trace.guards],
        "init_sha256": sha256_bytes(files["__init__.py"].encode("utf-8")),
        "subgraphs": entries,
        "edited": {},
    }
    if trace.skipped_targets:  # layers the model does not run for these inputs
        index["skipped_targets"] = trace.skipped_targets
    files[INDEX_NAME] = dump_index(index)
    write_package(out, files, force)
    seconds["total"] = time.perf_counter() - start
    logger.info("emitted %d subgraphs to %s in %.2fs", len(entries), out, seconds["total"])
    return EmitResult(path=out, index=index, seconds=seconds)


def emit(
    model: str | torch.nn.Module,
    out: str | os.PathLike[str],
    options: EmitOptions = EmitOptions(),
    *,
    force: bool = False,
) -> EmitResult:
    """Emit the package of a model id (see :mod:`seqgen.models`) or of a model instance."""
    if isinstance(model, str):
        from ..models import meta_model

        model = meta_model(model)
    return emit_model(model, out, options, force=force)
