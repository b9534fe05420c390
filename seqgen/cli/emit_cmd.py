"""``seqgen emit MODEL OUT``."""

from __future__ import annotations

from pathlib import Path

import click

from .options import revision_option, trust_remote_code_option
from .output import out


def _sample_shape(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    try:
        batch, seq = (int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not BATCH,SEQ (two integers, e.g. 2,64)") from None
    if batch < 1 or seq < 1:
        raise click.BadParameter(f"{value!r}: both sizes must be positive")
    return batch, seq


@click.command()
@click.argument("model")
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--targets",
    multiple=True,
    help="Sequential target: a module class name or a module-name regex. "
    "Repeatable. Default: the model's decoder layers.",
)
@click.option("--targets-per-subgraph", type=click.IntRange(min=1), default=1, help="Consecutive targets per subgraph.")
@click.option("--ignore", multiple=True, help="Function to call as a leaf instead of tracing into it. Repeatable.")
@click.option("--sample-shape", default="2,64", callback=_sample_shape, help="BATCH,SEQ of the trace-time sample.")
@click.option("--force", is_flag=True, help="Replace an existing package in OUT.")
@revision_option
@trust_remote_code_option
def emit(
    model: str,
    out_dir: Path,
    targets: tuple[str, ...],
    targets_per_subgraph: int,
    ignore: tuple[str, ...],
    sample_shape: tuple[int, int],
    force: bool,
    revision: str | None,
    trust_remote_code: bool,
) -> None:
    """Trace MODEL once and write its subgraph package to OUT.

    MODEL is a local directory, a hub id `org/name`, `smollm2-135m`, or `tiny:<model_type>`.
    """
    from ..emitter import EmitOptions
    from ..emitter import emit as emit_package
    from ..models import load_config, meta_model

    options = EmitOptions(
        targets=targets or None, targets_per_subgraph=targets_per_subgraph, ignore=ignore, sample_shape=sample_shape
    )
    source = meta_model(load_config(model, revision, trust_remote_code)) if revision or trust_remote_code else model
    result = emit_package(source, out_dir, options, force=force)
    count = len(result.index["subgraphs"])
    out(
        f"emitted {count} subgraphs of {result.index['model_class']} to {out_dir} "
        f"in {result.seconds['total']:.2f}s ({len(result.index['guards'])} guards)"
    )
