"""The calibration report as one self-contained HTML page: inline CSS and SVG, no scripts, nothing fetched.

Two charts show an outlier at a glance: the largest relative error of each layer (one bar per layer; bars above
twice the median in red), and each subgraph's seconds by phase (stacked bars). Tables follow: the worst modules, the
subgraphs' times and memory, the versions and options. A Content-Security-Policy forbids every request the page
could make, so it renders the same offline, in a mail attachment or a CI artifact.
"""

from __future__ import annotations

import json
import statistics
from html import escape
from typing import Any

from .report import layer_errors, worst_modules

__all__ = ["render_html"]

_PHASE_COLORS = {
    "onload": "#8da0cb",
    "calibrate": "#66c2a5",
    "compress": "#fc8d62",
    "propagate": "#e78ac3",
    "offload": "#a6d854",
}
_OTHER_COLOR = "#b3b3b3"
_WIDTH, _HEIGHT, _LEFT, _BOTTOM, _TOP = 760, 240, 64, 56, 12
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 60em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2em 0.8em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
svg text { font-size: 11px; fill: #444; }
.bar { fill: #4c78a8; } .bar.outlier { fill: #d62728; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def render_html(report: dict[str, Any], worst: int = 20) -> str:
    """The page for ``report`` (as :func:`seqgen.report.read_report` returns it), with the ``worst`` modules."""
    model = report["model"]
    title = f"seqgen calibration report: {model['id']}"
    totals = report["totals"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # nothing may be fetched: no scripts, fonts, images or styles from anywhere
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>{totals['linears']} linears quantized in {totals['calibration_seconds']:.1f} s"
        f" ({escape(_phases_text(totals['phase_seconds']))}).</p>",
        "<h2>Relative error per layer</h2>",
        "<p>The largest relative reconstruction error ||(W - Q) X||² / ||W X||² of each layer's modules; red bars "
        "are above twice the median.</p>",
        _error_chart(layer_errors(report)),
        "<h2>Time per phase</h2>",
        _phase_chart(report["subgraphs"]),
        f"<h2>Worst {worst} modules</h2>",
        _modules_table(worst_modules(report, worst)),
        "<h2>Subgraphs</h2>",
        _subgraphs_table(report["subgraphs"]),
        "<h2>Versions and options</h2>",
        f"<pre>{escape(json.dumps({'versions': report['versions'], 'options': report['options']}, indent=2))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _phases_text(seconds: dict[str, float]) -> str:
    return ", ".join(f"{phase} {value:.1f} s" for phase, value in seconds.items())


def _svg(label: str, body: list[str]) -> str:
    return (
        f'<svg role="img" aria-label="{escape(label)}" class="chart" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" xmlns="http://www.w3.org/2000/svg">' + "".join(body) + "</svg>"
    )


def _axis(top_value: float, unit: str) -> list[str]:
    """The y axis of a chart whose top is ``top_value``: three gridlines with their values."""
    plot = _HEIGHT - _BOTTOM - _TOP
    body = []
    for fraction in (0.0, 0.5, 1.0):
        y = _TOP + plot * (1 - fraction)
        body.append(f'<line x1="{_LEFT}" x2="{_WIDTH}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        body.append(f'<text x="{_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{top_value * fraction:.3g}{unit}</text>')
    return body


def _bar_slots(count: int) -> tuple[float, float]:
    """Each bar's slot width and the bar's own width, for ``count`` bars."""
    slot = (_WIDTH - _LEFT) / max(count, 1)
    return slot, max(slot * 0.8, 1.0)


def _x_label(x: float, text: str, every: int, i: int) -> str:
    """A rotated label under a bar, for every ``every``-th bar (so that they do not overlap)."""
    if i % every:
        return ""
    y = _HEIGHT - _BOTTOM + 10
    return f'<text x="{x:.1f}" y="{y}" transform="rotate(45 {x:.1f} {y})">{escape(text)}</text>'


def _error_chart(layers: list[tuple[str, float, str]]) -> str:
    if not layers:
        return "<p>No relative errors were measured (the algorithm does not measure them, e.g. RTN).</p>"
    top = max(error for _, error, _ in layers) or 1.0
    threshold = 2 * statistics.median(error for _, error, _ in layers)
    plot = _HEIGHT - _BOTTOM - _TOP
    slot, width = _bar_slots(len(layers))
    every = max(1, len(layers) // 30)
    body = _axis(top, "")
    for i, (label, error, module) in enumerate(layers):
        height = plot * error / top
        x = _LEFT + i * slot
        kind = "bar outlier" if error > threshold else "bar"
        body.append(
            f'<rect class="{kind}" data-layer="{escape(label)}" x="{x:.1f}" y="{_TOP + plot - height:.1f}" '
            f'width="{width:.1f}" height="{height:.1f}"><title>{escape(label)}: {error:.4g} ({escape(module)})'
            "</title></rect>"
        )
        body.append(_x_label(x + width / 2, label, every, i))
    return _svg("relative error per layer", body)


def _phase_chart(subgraphs: list[dict[str, Any]]) -> str:
    seen = {phase for sg in subgraphs for phase in sg["seconds"]}
    phases = [phase for phase in _PHASE_COLORS if phase in seen] + sorted(seen - set(_PHASE_COLORS))
    top = max((sum(sg["seconds"].values()) for sg in subgraphs), default=0.0) or 1.0
    plot = _HEIGHT - _BOTTOM - _TOP
    slot, width = _bar_slots(len(subgraphs))
    every = max(1, len(subgraphs) // 30)
    body = _axis(top, " s")
    for i, sg in enumerate(subgraphs):
        x, y = _LEFT + i * slot, float(_TOP + plot)
        for phase in phases:
            height = plot * sg["seconds"].get(phase, 0.0) / top
            y -= height
            color = _PHASE_COLORS.get(phase, _OTHER_COLOR)
            body.append(
                f'<rect class="segment" data-phase="{escape(phase)}" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" '
                f'height="{height:.1f}" fill="{color}"><title>{escape(sg["name"])} {escape(phase)}: '
                f'{sg["seconds"].get(phase, 0.0):.2f} s</title></rect>'
            )
        body.append(_x_label(x + width / 2, sg["name"].removeprefix("subgraph_"), every, i))
    legend = "".join(
        f'<span style="margin-right:1em"><span style="display:inline-block;width:0.8em;height:0.8em;background:'
        f'{_PHASE_COLORS.get(phase, _OTHER_COLOR)}"></span> {escape(phase)}</span>'
        for phase in phases
    )
    return _svg("seconds per phase and subgraph", body) + f'<p class="legend">{legend}</p>'


def _table(header: list[str], rows: list[list[tuple[str, bool]]]) -> str:
    """A table; each cell is its text and whether it is a number (right-aligned)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if num else ""}>{escape(text)}</td>' for text, num in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _modules_table(modules: list[dict[str, Any]]) -> str:
    return _table(
        ["module", "subgraph", "scheme", "tokens", "relative error"],
        [
            [
                (m["name"], False),
                (m["subgraph"], False),
                (m["scheme"], False),
                ("" if m["tokens"] is None else str(m["tokens"]), True),
                ("" if m["relative_error"] is None else f"{m['relative_error']:.4g}", True),
            ]
            for m in modules
        ],
    )


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.0f} MiB"


def _subgraphs_table(subgraphs: list[dict[str, Any]]) -> str:
    return _table(
        ["subgraph", "targets", "linears", "seconds by phase", "device peak", "process peak RSS so far"],
        [
            [
                (sg["name"], False),
                (", ".join(sg["targets"]), False),
                (str(sg["linears"]), True),
                (_phases_text(sg["seconds"]), False),
                (_mib(sg["device_peak_bytes"]), True),
                (_mib(sg["rss_peak_bytes"]), True),
            ]
            for sg in subgraphs
        ],
    )
