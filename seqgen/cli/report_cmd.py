"""``seqgen report``: the worst modules of a calibration, and its HTML page."""

from __future__ import annotations

from pathlib import Path

import click

from .output import out

__all__ = ["report"]


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--worst", type=click.IntRange(min=1), default=10, help="Modules to list, largest error first.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the page. Default: DIRECTORY/seqgen_report.html.",
)
def report(directory: Path, worst: int, html_path: Path | None) -> None:
    """Print the modules of the model saved in DIRECTORY with the largest relative reconstruction error, and write
    a self-contained HTML page with charts of the error per layer and the time per phase."""
    import os

    from ..outputs import add_to_manifest
    from ..report import read_report, worst_modules
    from ..report_html import render_html

    data = read_report(directory)
    totals = data["totals"]
    out(f"{data['model']['id']}: {totals['linears']} linears, calibrated in {totals['calibration_seconds']:.1f}s")
    rows = [
        (
            m["name"],
            m["scheme"],
            "-" if m["tokens"] is None else str(m["tokens"]),
            "-" if m["relative_error"] is None else f"{m['relative_error']:.4g}",
        )
        for m in worst_modules(data, worst)
    ]
    for line in _table(("module", "scheme", "tokens", "rel. error"), rows):
        out(line)
    html_path = html_path or directory / "seqgen_report.html"
    tmp = html_path.with_name(f".{html_path.name}.tmp")
    tmp.write_text(render_html(data, worst=max(worst, 20)), encoding="utf-8")
    os.replace(tmp, html_path)
    if html_path.parent.resolve() == directory.resolve():
        add_to_manifest(directory, html_path.name)  # seqgen's own file: --overwrite may replace it with the rest
    out(f"wrote {html_path}")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Lines of a text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))]
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]
