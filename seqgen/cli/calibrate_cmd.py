"""``seqgen calibrate`` and ``seqgen eval``."""

from __future__ import annotations

from pathlib import Path

import click

from ..choices import DType, Grid, Observer, Offload, SaveFormat
from .options import revision_option
from .output import out
from .run_options import report_run_dir, run_dir_options, run_resumable


class _RegisteredAlgorithm(click.Choice):
    """The algorithms registered when the command line is parsed: seqgen's, and any that the calling program
    registered with ``seqgen.algorithms.register_algorithm``. Read on use, so torch loads only when a command that
    needs it runs (or shows its help)."""

    def __init__(self) -> None:  # no fixed list: see ``choices``
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from ..algorithms import ALGORITHMS

        return tuple(sorted(ALGORITHMS))


def _group_size(ctx: click.Context, param: click.Parameter, value: int) -> int | None:
    """Columns per scale; -1 is one scale per output channel (None in QuantScheme)."""
    if value == 0:
        raise click.BadParameter("0 is not a group size: use a positive number of columns, or -1 for per-channel.")
    return None if value == -1 else value


@click.command()
@revision_option
@click.argument("package", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_id", required=True, help="Model id or checkpoint directory (see `seqgen emit`).")
@click.option(
    "--dataset",
    default=None,
    help="A .txt or .jsonl file, or a Hugging Face dataset NAME[:CONFIG][@SPLIT] (online, needs the datasets "
    "package). Default: the built-in corpus.",
)
@click.option(
    "--algorithm",
    type=_RegisteredAlgorithm(),
    default="gptq",
    help="A registered algorithm (seqgen.algorithms.register_algorithm).",
)
@click.option("--bits", type=click.Choice(["4", "8"]), default="4")
@click.option(
    "--group-size",
    type=click.IntRange(min=-1),
    default=64,
    callback=_group_size,
    help="Columns per scale; -1 for one scale per output channel.",
)
@click.option("--asym", is_flag=True, help="Asymmetric quantization (zero points).")
@click.option(
    "--grid",
    type=click.Choice(Grid.values()),
    default="full",
    show_default=True,
    help="Symmetric scales: full maps each group's larger-magnitude weight exactly onto the lowest code (all 2^b "
    "levels in use); minmax is llm-compressor's max|w|/((qmax-qmin)/2), for bitwise parity with it.",
)
@click.option(
    "--observer",
    type=click.Choice(Observer.values()),
    default="minmax",
    show_default=True,
    help="Each group's range: its extremes, or (mse) the shrunk range, down to 0.81 of them, that quantizes the "
    "group with the least error.",
)
@click.option(
    "--act-order/--no-act-order",
    default=True,
    help="GPTQ: visit columns by descending Hessian diagonal (static groups: no cost at inference).",
)
@click.option("--dampening", type=float, default=0.01, help="GPTQ: fraction of mean(diag(H)) added to the diagonal.")
@click.option("--num-samples", type=click.IntRange(min=1), default=64)
@click.option("--seq-len", type=click.IntRange(min=1), default=512)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help="Samples per forward call.")
@click.option("--ignore", multiple=True, help="Regex over module names not to quantize (lm_head never is). Repeatable.")
@click.option(
    "--no-propagate-error",
    is_flag=True,
    help="Feed each subgraph the unquantized outputs of the previous one (one pass instead of two).",
)
@click.option("--observe", is_flag=True, help="Also save per-channel activation statistics of quantized inputs.")
@click.option(
    "--all-experts",
    is_flag=True,
    help="MoE: feed every calibration token to every expert's statistics (routing and outputs unchanged), "
    "so rarely routed experts still get GPTQ Hessian data.",
)
@click.option(
    "--experts-per-pass",
    type=click.IntRange(min=1),
    default=None,
    help="MoE: collect statistics for this many experts per calibration pass (more passes, less memory for "
    "the statistics). Default: all experts in one pass.",
)
@click.option(
    "--offload",
    type=click.Choice(Offload.values()),
    default=Offload.MEMORY.value,
    help="Where weights wait between subgraphs: CPU RAM, or the checkpoint's safetensors files.",
)
@click.option(
    "--spill-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the activations between subgraphs in files under this directory instead of RAM (one "
    "batch in memory at a time; for calibration sets larger than RAM).",
)
@click.option(
    "--dtype",
    type=click.Choice(DType.values()),
    default=None,
    help="Weights and activations while calibrating (GPTQ's Hessian and solve stay fp32); auto: the "
    "checkpoint's own. Default: auto on CUDA, float32 on the CPU.",
)
@click.option("--device", default=None, help="Execution device. Default: cuda:0 when available, else cpu.")
@click.option("--reemit", is_flag=True, help="Ignore the partition cache and emit the package again.")
@click.option("--save", "save_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--save-format",
    type=click.Choice(SaveFormat.values()),
    default=SaveFormat.COMPRESSED.value,
    help="compressed: compressed-tensors (packed ints + scales) for vLLM; fake: dequantized weights.",
)
@run_dir_options
def calibrate(
    revision: str | None,
    package: Path | None,
    model_id: str,
    dataset: str | None,
    algorithm: str,
    bits: str,
    group_size: int | None,
    asym: bool,
    grid: str,
    observer: str,
    act_order: bool,
    dampening: float,
    num_samples: int,
    seq_len: int,
    batch_size: int,
    ignore: tuple[str, ...],
    no_propagate_error: bool,
    observe: bool,
    all_experts: bool,
    experts_per_pass: int | None,
    offload: str,
    spill_dir: Path | None,
    dtype: str | None,
    device: str | None,
    reemit: bool,
    save_dir: Path,
    save_format: str,
    run_dir: Path | None,
    resume: Path | None,
    checkpoint_every: int,
) -> None:
    """Quantize MODEL layer by layer with PACKAGE (default: from the partition cache) and save it."""
    from ..algorithms import QuantScheme
    from ..job import CalibrationJob
    from ..runtime import CalibrationOptions

    scheme = QuantScheme(
        bits=int(bits),
        group_size=group_size,
        symmetric=not asym,
        grid=grid,
        observer=observer,
        act_order=act_order,
        dampening=dampening,
    )
    job = CalibrationJob(
        model_id=model_id,
        revision=revision,
        package=package,
        dataset=dataset,
        num_samples=num_samples,
        seq_len=seq_len,
        batch_size=batch_size,
        offload=offload,
        reemit=reemit,
        save_dir=save_dir,
        save_format=save_format,
        dtype=dtype,
        options=CalibrationOptions(
            algorithm=algorithm,
            scheme=scheme,
            ignore=ignore,
            propagate_error=not no_propagate_error,
            observe=observe,
            device=device,
            all_experts=all_experts,
            experts_per_pass=experts_per_pass,
            spill_dir=spill_dir,
        ),
        run_dir=run_dir,
        resume=resume,
        checkpoint_every=checkpoint_every,
    )
    summary = run_resumable(job)
    source = "cache hit" if summary.cache_hit else ("given" if package else "emitted")
    out(f"package: {summary.package_path} ({source})")
    experts = f" and {len(summary.result.experts)} expert projections" if summary.result.experts else ""
    out(
        f"quantized {summary.linears} linears{experts} with {algorithm} W{bits} group {group_size or 'per-channel'} in "
        f"{summary.calibration_seconds:.1f}s (total {summary.total_seconds:.1f}s)"
    )
    if summary.result.unquantized:
        out(
            f"left {len(summary.result.unquantized)} linears unquantized: their forward never ran while calibrating "
            "(see the warning above)"
        )
    if summary.result.round_to_nearest:
        out(
            f"quantized {len(summary.result.round_to_nearest)} expert weights round-to-nearest: no calibration "
            "token reached them (see the warning above)"
        )
    out(f"time by phase: {summary.result.phase_summary()}")
    out(f"saved {save_format} model to {save_dir}")
    report_run_dir(summary)


@click.command(name="eval")
@revision_option
@click.option("--model", "model_id", required=True, help="Model id or checkpoint directory (quantized or not).")
@click.option(
    "--dataset",
    default=None,
    help="A .txt or .jsonl file, or a Hugging Face dataset NAME[:CONFIG][@SPLIT] (online, needs the datasets "
    "package). Default: the built-in held-out corpus.",
)
@click.option("--seq-len", type=click.IntRange(min=2), default=512)
@click.option("--max-samples", type=click.IntRange(min=1), default=40)
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option(
    "--dtype",
    type=click.Choice(DType.values()),
    default=None,
    help="auto: the checkpoint's own. Default: auto on CUDA, float32 on the CPU.",
)
@click.option(
    "--device",
    default=None,
    help="Default: the GPUs when CUDA is available (a model larger than one is spread over them and the "
    "CPU), else cpu.",
)
def evaluate(
    revision: str | None,
    model_id: str,
    dataset: str | None,
    seq_len: int,
    max_samples: int,
    batch_size: int,
    dtype: str | None,
    device: str | None,
) -> None:
    """Print the perplexity of MODEL on held-out text."""
    from ..evaluate import perplexity
    from ..job import heldout_samples, load_tokenizer, model_dtype
    from ..models import load_model
    from ..runtime import execution_device

    target = execution_device(device)
    placement = {}
    if target.type != "cpu":
        placement = {"device_map": "auto" if device is None else {"": str(target)}}
    model = load_model(model_id, model_dtype(dtype, model_id, target, revision), revision, **placement)
    samples = heldout_samples(load_tokenizer(model_id, revision), dataset, seq_len, max_samples)
    value = perplexity(model, samples, batch_size=batch_size)
    out(f"perplexity: {value:.4f} ({samples.shape[0]} samples x {seq_len} tokens)")
