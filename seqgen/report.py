"""The calibration report: what ``seqgen calibrate --save DIR`` did, as ``DIR/seqgen_report.json``.

It holds, per quantized module, its scheme, the calibration tokens its input had and (GPTQ) the relative
reconstruction error of its output, ``||(W - Q) X||^2 / ||W X||^2`` over the calibration inputs; per subgraph, the
seconds of each phase and the peak memory; the versions and options of the run. ``seqgen report DIR`` reads it back
(:func:`read_report`), prints the worst modules (:func:`worst_modules`) and renders an HTML page
(:mod:`seqgen.report_html`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SeqgenError

if TYPE_CHECKING:
    from .algorithms import QuantScheme
    from .job import CalibrationJob
    from .package import Package
    from .runtime import CalibrationResult

__all__ = [
    "REPORT_NAME",
    "REPORT_VERSION",
    "build_report",
    "layer_errors",
    "read_report",
    "scheme_label",
    "worst_modules",
    "write_report",
]

REPORT_NAME = "seqgen_report.json"
REPORT_VERSION = 1
_DISTRIBUTIONS = ("torch", "transformers", "compressed-tensors", "accelerate", "safetensors")


def scheme_label(scheme: QuantScheme) -> str:
    """A scheme in a few words, e.g. ``W4A16 g64 sym act-order``."""
    group = "per-channel" if scheme.group_size is None else f"g{scheme.group_size}"
    words = [f"W{scheme.bits}A16", group, "sym" if scheme.symmetric else "asym"]
    if scheme.act_order:
        words.append("act-order")
    if scheme.observer != "minmax":
        words.append(f"{scheme.observer} observer")
    return " ".join(words)


def _versions() -> dict[str, str]:
    from .version import __version__

    versions = {"seqgen": __version__, "python": platform.python_version()}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _plain(value: Any) -> Any:
    """Options as JSON values: dataclasses as dicts, paths and enums as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value.value if hasattr(value, "value") else value  # str enums are str
    return str(value)


def build_report(job: CalibrationJob, package: Package, result: CalibrationResult) -> dict[str, Any]:
    """The report of a finished calibration job, as JSON-ready data."""
    targets = {sg.name: list(sg.targets) for sg in package.subgraphs}
    subgraphs, modules = [], []
    for report in result.reports:
        subgraphs.append(
            {
                "name": report.name,
                "targets": targets.get(report.name, []),
                "linears": report.linears,
                "seconds": dict(report.seconds),
                "device_peak_bytes": report.device_peak_bytes,
                "rss_peak_bytes": report.rss_peak_bytes,
            }
        )
        for name, module in report.modules.items():
            modules.append(
                {
                    "name": name,
                    "subgraph": report.name,
                    "scheme": scheme_label(module.scheme),
                    "tokens": module.tokens,
                    "relative_error": module.relative_error,
                }
            )
    return {
        "report_version": REPORT_VERSION,
        "model": {"id": job.model_id, "revision": job.revision, "package": str(package.path)},
        "versions": _versions(),
        "options": _plain(job),
        "totals": {
            "calibration_seconds": result.seconds,
            "phase_seconds": result.phase_seconds(),
            "linears": result.linears,
            "peak_device_bytes": result.peak_device_bytes,
            "unquantized": list(result.unquantized),
            "round_to_nearest": list(result.round_to_nearest),
        },
        "subgraphs": subgraphs,
        "modules": modules,
    }


def write_report(directory: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` to ``directory/seqgen_report.json`` (a temporary file renamed into place)."""
    path = directory / REPORT_NAME
    tmp = directory / f".{REPORT_NAME}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_report(directory: Path) -> dict[str, Any]:
    """The report that ``seqgen calibrate --save DIRECTORY`` wrote; SeqgenError when there is none or it is
    unreadable."""
    path = directory / REPORT_NAME
    if not path.is_file():
        raise SeqgenError(
            f"{directory} has no {REPORT_NAME}: it is written by `seqgen calibrate --save {directory}`; calibrate "
            "again with this seqgen to get one."
        )
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SeqgenError(f"{path} is not valid JSON ({exc}); calibrate again to rewrite it.") from None
    if not isinstance(report, dict) or report.get("report_version") != REPORT_VERSION:
        raise SeqgenError(
            f"{path} is not a report this seqgen reads (report_version {REPORT_VERSION} expected); calibrate again "
            "with this seqgen to rewrite it."
        )
    return report


def worst_modules(report: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The ``count`` modules with the largest relative error (modules without one last, in their order)."""
    measured = [m for m in report["modules"] if m["relative_error"] is not None]
    unmeasured = [m for m in report["modules"] if m["relative_error"] is None]
    return (sorted(measured, key=lambda m: -m["relative_error"]) + unmeasured)[:count]


def layer_errors(report: dict[str, Any]) -> list[tuple[str, float, str]]:
    """Per subgraph with measured modules, in order: its label (its targets), the largest relative error of its
    modules, and that module's name."""
    worst: dict[str, tuple[float, str]] = {}
    for module in report["modules"]:
        error = module["relative_error"]
        if error is not None and error >= worst.get(module["subgraph"], (-1.0, ""))[0]:
            worst[module["subgraph"]] = (error, module["name"])
    rows = []
    for subgraph in report["subgraphs"]:
        if subgraph["name"] in worst:
            error, module = worst[subgraph["name"]]
            rows.append((_label(subgraph), error, module))
    return rows


def _label(subgraph: dict[str, Any]) -> str:
    """A subgraph's short name: its one target's (``layers.3``), or its own."""
    targets = subgraph["targets"]
    if len(targets) == 1:
        return re.sub(r"^model\.", "", targets[0])
    return subgraph["name"]
