"""``seqgen calibrate`` and ``seqgen eval``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..choices import DType, Grid, Observer, Offload, Preset, SaveFormat
from .options import revision_option, trust_remote_code_option

if TYPE_CHECKING:
    from ..algorithms import QuantScheme
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
@trust_remote_code_option
@click.argument("package", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_id", required=True, help="Model id or checkpoint directory (see `seqgen emit`).")
@click.option(
    "--dataset",
    default=None,
    help="A .txt or .jsonl file, or a Hugging Face dataset NAME[:CONFIG][@SPLIT] (online, needs the datasets "
    "package). Default: the built-in corpus. A .jsonl of chats with images calibrates a vision-language model on "
    "them (one chat a batch, rendered by the model's processor; the package is traced with image inputs).",
)
@click.option(
    "--quantize-vision",
    is_flag=True,
    help="With image data: calibrate the vision tower's blocks too. Default: they stay in full precision, as vLLM "
    "recipes leave them.",
)
@click.option(
    "--algorithm",
    type=_RegisteredAlgorithm(),
    default="gptq",
    help="A registered algorithm (seqgen.algorithms.register_algorithm).",
)
@click.option(
    "--scheme",
    "scheme_name",
    type=click.Choice(Preset.values(), case_sensitive=False),
    default=None,
    help="A compressed-tensors preset (llm-compressor's names and checkpoint layout); --bits, --group-size and "
    "--asym given too override its weights. Default: the integer weight-only scheme of --bits/--group-size/--asym.",
)
@click.option(
    "--smoothquant",
    type=click.FloatRange(0.0, 1.0),
    is_flag=False,
    flag_value=0.8,
    default=None,
    help="SmoothQuant before the weights are found, with this strength (alone: 0.8, llm-compressor's W8A8 recipe): "
    "activation outliers move into the weights of the linears a norm feeds.",
)
@click.option(
    "--bits",
    type=click.Choice(["2", "3", "4", "8"]),
    default="4",
    show_default=True,
    help="Weight bits. vLLM serves 4 and 8 (pack-quantized int); 2 and 3 save in the same layout, for research.",
)
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
@click.option(
    "--tune-iterations",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Block tuning after the algorithm (rtn: AutoRound's start; gptq): signed-gradient steps per subgraph that "
    "fit its quantized linears' rounding and group scales to its full-precision outputs, one calibration batch "
    "(--batch-size samples) per step. 0: off; 50 light, 200 thorough.",
)
@click.option(
    "--tune-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Block tuning's first step size, decaying linearly to 0. Default: 1 / --tune-iterations.",
)
@click.option("--tune-seed", type=int, default=0, show_default=True, help="Block tuning's order of batches.")
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
    "--overwrite",
    is_flag=True,
    help="Replace --save when it holds an earlier seqgen output (never a directory with other files).",
)
@click.option(
    "--save-format",
    type=click.Choice(SaveFormat.values()),
    default=SaveFormat.COMPRESSED.value,
    help="compressed: compressed-tensors (packed ints + scales) for vLLM; fake: dequantized weights.",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    help="Calibrate data-parallel in this many processes on this machine (torchrun, one per GPU; gloo on the CPU).",
)
@click.option(
    "--exact-hessian",
    is_flag=True,
    help="GPTQ: sum Hessians in fp64, so the result does not depend on how batches are split (on with several "
    "processes: then one process with this flag gives the same checkpoint bitwise).",
)
@click.option(
    "--rank-timeout",
    type=click.FloatRange(min=1),
    default=1800,
    help="Under torchrun: seconds a rank waits for the others before it stops (a rank that failed or hangs).",
)
@run_dir_options
def calibrate(
    revision: str | None,
    trust_remote_code: bool,
    package: Path | None,
    model_id: str,
    dataset: str | None,
    quantize_vision: bool,
    algorithm: str,
    scheme_name: str | None,
    smoothquant: float | None,
    bits: str,
    group_size: int | None,
    asym: bool,
    grid: str,
    observer: str,
    act_order: bool,
    dampening: float,
    tune_iterations: int,
    tune_lr: float | None,
    tune_seed: int,
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
    overwrite: bool,
    save_format: str,
    nproc: int,
    exact_hessian: bool,
    rank_timeout: float,
    run_dir: Path | None,
    resume: Path | None,
    checkpoint_every: int,
) -> None:
    """Quantize MODEL layer by layer with PACKAGE (default: from the partition cache) and save it.

    Also runs under ``torchrun --nproc-per-node N -m seqgen calibrate ...`` (one process per GPU, any number of
    nodes), or ``--nproc N``, which starts torchrun on this machine."""
    import sys

    from ..algorithms import QuantScheme
    from ..algorithms.blocktune import TuneOptions
    from ..job import CalibrationJob
    from ..runtime import CalibrationOptions
    from ..runtime.distributed import join_process_group, launch, launched_by_torchrun

    if nproc > 1 and not launched_by_torchrun():
        launch(nproc, sys.argv[1:])
        return
    ranks = join_process_group(device, rank_timeout)

    fields = {"grid": grid, "observer": observer, "act_order": act_order, "dampening": dampening}
    if scheme_name is None:
        scheme = QuantScheme(bits=int(bits), group_size=group_size, symmetric=not asym, **fields)
    else:
        scheme = _preset(scheme_name, bits, group_size, asym, fields)
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
        quantize_vision=quantize_vision,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        options=CalibrationOptions(
            algorithm=algorithm,
            scheme=scheme,
            ignore=ignore,
            propagate_error=not no_propagate_error,
            observe=observe,
            smoothquant=smoothquant,
            all_experts=all_experts,
            experts_per_pass=experts_per_pass,
            spill_dir=spill_dir,
            device=ranks.device,
            exact_hessian=exact_hessian or ranks.world > 1,
            tune=TuneOptions(tune_iterations, tune_lr, tune_seed) if tune_iterations else None,
        ),
        run_dir=run_dir,
        resume=resume,
        checkpoint_every=checkpoint_every,
    )
    summary = run_resumable(job)
    if not ranks.is_main:
        return
    source = "cache hit" if summary.cache_hit else ("given" if package else "emitted")
    out(f"package: {summary.package_path} ({source})")
    experts = f" and {len(summary.result.experts)} expert projections" if summary.result.experts else ""
    per_rank = "/".join(str(count) for count in summary.samples_per_rank)
    on_ranks = f" on {ranks.world} ranks ({per_rank} samples)" if ranks.world > 1 else ""
    tuned = f" + block tuning ({tune_iterations} iterations)" if tune_iterations else ""
    out(
        f"quantized {summary.linears} linears{experts} with {algorithm}{tuned} {_describe(scheme_name, scheme)}"
        f"{on_ranks} in {summary.calibration_seconds:.1f}s (total {summary.total_seconds:.1f}s)"
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


def _preset(name: str, bits: str, group_size: int | None, asym: bool, fields: dict) -> QuantScheme:
    """The preset ``name`` with the weight options the command line gave explicitly (not their defaults)."""
    from ..algorithms import scheme_from_preset

    ctx = click.get_current_context()

    def given(param: str) -> bool:
        return ctx.get_parameter_source(param) is not click.core.ParameterSource.DEFAULT

    overrides = {"bits": int(bits) if given("bits") else None, "asym": True if given("asym") else None}
    if given("group_size"):
        overrides["group_size"] = group_size
    return scheme_from_preset(name, **overrides, **fields)


def _describe(name: str | None, scheme: QuantScheme) -> str:
    """``W4 group 64`` (or the preset's name first): what the summary line says the weights were quantized as."""
    group = "per-tensor" if scheme.per_tensor else f"group {scheme.group_size}" if scheme.group_size else "per-channel"
    weights = f"{'FP' if scheme.type == 'float' else 'W'}{scheme.bits} {group}"
    return weights if name is None else f"{name.upper()} ({weights})"


@click.command(name="eval")
@revision_option
@trust_remote_code_option
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
    trust_remote_code: bool,
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
    trust = trust_remote_code
    tokenizer = load_tokenizer(model_id, revision, trust)  # a checkpoint without one is refused before the weights load
    model = load_model(model_id, model_dtype(dtype, model_id, target, revision, trust), revision, trust, **placement)
    samples = heldout_samples(tokenizer, dataset, seq_len, max_samples)
    value = perplexity(model, samples, batch_size=batch_size)
    out(f"perplexity: {value:.4f} ({samples.shape[0]} samples x {seq_len} tokens)")
