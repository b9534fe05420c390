"""A whole calibration job, as ``seqgen calibrate`` runs it: model, package, data, calibration, save.

The package comes from the path given or from the partition cache (emitted on a miss, once). Weights wait in RAM
(``offload="memory"``) or stay in the checkpoint's safetensors files (``offload="disk"``) until their subgraph runs.
The string options take the values of the enums in :mod:`seqgen.choices`; any other value is refused when the job
is created, before anything loads.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import SafetensorsWeights
from .choices import DType, Offload, SaveFormat
from .errors import BadInput, SeqgenError
from .runtime import CalibrationOptions, CalibrationResult, calibrate, execution_device

__all__ = [
    "DTYPES",
    "CalibrationJob",
    "JobSummary",
    "run_job",
    "load_tokenizer",
    "model_dtype",
    "calibration_samples",
    "heldout_samples",
]

logger = logging.getLogger(__name__)

# What the model computes in while it is calibrated; GPTQ's statistics and solve are fp32 whatever this is.
DTYPES = tuple(DType.values())


@dataclass(frozen=True)
class CalibrationJob:
    model_id: str
    save_dir: Path
    revision: str | None = None  # of a hub model id: a branch, tag or commit (default: main)
    package: Path | None = None
    dataset: str | Path | None = None  # a .txt/.jsonl file or a Hugging Face dataset name
    num_samples: int = 64
    seq_len: int = 512
    batch_size: int = 8
    offload: Offload = Offload.MEMORY  # or the plain string, "memory" or "disk"
    reemit: bool = False
    save_format: SaveFormat = SaveFormat.COMPRESSED  # or "compressed" or "fake"
    dtype: DType | None = None  # weights and activations while calibrating (see model_dtype)
    quantize_vision: bool = False  # image data: calibrate the vision towers' blocks too (default: left unquantized)
    overwrite: bool = False  # replace save_dir when it holds a previous seqgen output (see seqgen.outputs)
    options: CalibrationOptions = field(default_factory=CalibrationOptions)
    trust_remote_code: bool = False  # run the model's own modeling code (auto_map), as transformers' option
    # checkpoints for resuming (seqgen.run): the run directory (default under $SEQGEN_CACHE/runs), a killed run's
    # run directory to continue, and the subgraphs between checkpoints (0: none)
    run_dir: Path | None = None
    resume: Path | None = None
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        """Plain strings become enum members; a value that is not a choice, or an unregistered algorithm, raises
        SeqgenError here rather than after the model has loaded."""
        from .algorithms import ALGORITHMS, get_algorithm
        from .images import has_images

        object.__setattr__(self, "offload", Offload.parse(self.offload, "CalibrationJob.offload"))
        object.__setattr__(self, "save_format", SaveFormat.parse(self.save_format, "CalibrationJob.save_format"))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", DType.parse(self.dtype, "CalibrationJob.dtype"))
        if self.options.algorithm not in ALGORITHMS:
            get_algorithm(self.options.algorithm, self.options.scheme)  # raises, naming the registered algorithms
        if self.quantize_vision and not has_images(self.dataset):
            raise SeqgenError(
                "--quantize-vision calibrates the vision tower, which only image data runs; pass a .jsonl of chats "
                "with images as --dataset (see the README's vision-language section)."
            )


@dataclass
class JobSummary:
    package_path: Path
    cache_hit: bool
    linears: int
    calibration_seconds: float
    total_seconds: float
    result: CalibrationResult
    model: torch.nn.Module  # quantized in place (in disk mode: the skeleton, weights released)
    samples_per_rank: tuple[int, ...] = ()  # under torchrun: the calibration samples of each rank, in rank order
    run_dir: Path | None = None  # the run directory of the finished run (None without checkpoints)


# Files of which transformers builds a tokenizer (without any, it builds an empty one from the config alone)
_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "*.model", "*.tiktoken", "spiece*", "sentencepiece*")


def load_tokenizer(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer. A vision-language checkpoint may keep its chat template with the processor
    (``chat_template.jinja``, or ``chat_template.json``) rather than the tokenizer: the tokenizer then gets it, so
    chat-formatted calibration data is rendered as the model was trained."""
    import json

    from transformers import AutoTokenizer

    from .models import checkpoint_dir

    directory = checkpoint_dir(model_id, revision, weights=False)
    fix = f"Copy the model's tokenizer files into {directory}, or save its tokenizer with it (save_pretrained)."
    if not any(any(directory.glob(pattern)) for pattern in _TOKENIZER_FILES):
        raise BadInput(
            f"{directory} has no tokenizer files (tokenizer.json, tokenizer_config.json, a vocabulary), from which "
            f"transformers would build an empty tokenizer. {fix}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{directory} has no usable tokenizer ({reason}). {fix}") from None
    if len(tokenizer) <= 1:
        raise BadInput(f"the tokenizer of {directory} has an empty vocabulary ({len(tokenizer)} tokens). {fix}")
    if not getattr(tokenizer, "chat_template", None):
        if (directory / "chat_template.jinja").is_file():
            tokenizer.chat_template = (directory / "chat_template.jinja").read_text()
        elif (directory / "chat_template.json").is_file():
            tokenizer.chat_template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    return tokenizer


# Characters of a Hugging Face dataset read per token needed: about 4 characters a token, 4 times the text needed,
# so that the windows pack picks come from across the text read.
_CHARS_PER_TOKEN_NEEDED = 16


def _samples(tokenizer: Any, dataset: str | Path | None, split: str, seq_len: int, num_samples: int) -> torch.Tensor:
    from .data import pack, resolve_texts

    texts = resolve_texts(dataset, split, tokenizer, max_chars=_CHARS_PER_TOKEN_NEEDED * seq_len * num_samples)
    return pack(texts, tokenizer, seq_len, num_samples)


def calibration_samples(tokenizer: Any, dataset: str | Path | None, seq_len: int, num_samples: int) -> torch.Tensor:
    return _samples(tokenizer, dataset, "calibration", seq_len, num_samples)


def heldout_samples(tokenizer: Any, dataset: str | Path | None, seq_len: int, num_samples: int) -> torch.Tensor:
    return _samples(tokenizer, dataset, "heldout", seq_len, num_samples)


def model_dtype(
    name: DType | str | None,
    model_id: str,
    device: torch.device,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> torch.dtype:
    """The torch dtype for ``--dtype NAME``; ``auto`` is the checkpoint's own (its config's ``dtype``), else fp32.

    Without a name: ``auto`` on CUDA (a 70B bf16 checkpoint would need twice the memory in fp32), float32 on the CPU,
    where bf16 matmuls are slower and fp32 is what the eager model is checked against.
    """
    if name is None:
        name = DType.AUTO if device.type == "cuda" else DType.FLOAT32
    name = DType.parse(name, "dtype")
    if name != DType.AUTO:
        return getattr(torch, name.value)
    from .models import load_config

    stored = getattr(load_config(model_id, revision, trust_remote_code), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32


def _disk_model(directory: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model skeleton: parameters on meta, buffers real (non-persistent ones such as rotary tables)."""
    from accelerate import init_empty_weights

    from .models import load_config, model_from_config

    config = load_config(str(directory), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = model_from_config(config, dtype)
    model.tie_weights()  # as from_pretrained does: tied weights are one parameter, stored under one name
    return model.eval()


def _calibration_data(job: CalibrationJob, tokenizer: Any, traced: torch.nn.Module) -> tuple[list[dict], Any]:
    """The calibration batches, and the options of the package that runs them: text packed into ``seq_len`` windows
    for the default package, or chats with images (:mod:`seqgen.images`), one a batch, for a package traced with
    image inputs."""
    from .data import batches
    from .emitter import EmitOptions
    from .images import emit_options, has_images, image_batches, load_image_chats, load_processor
    from .models import checkpoint_dir
    from .trace.targets import find_targets, tower_targets

    if not has_images(job.dataset):
        samples = calibration_samples(tokenizer, job.dataset, job.seq_len, job.num_samples)
        return batches(samples, job.batch_size), EmitOptions()
    chats = load_image_chats(job.dataset)
    processor = load_processor(checkpoint_dir(job.model_id, job.revision, weights=False), job.trust_remote_code)
    image_data = image_batches(chats, processor, job.num_samples)
    targets = [*tower_targets(traced), *find_targets(traced)] if job.quantize_vision else None
    logger.info("calibration data: %d chats with %d images, one a batch", len(image_data), chats.images)
    return image_data, emit_options(traced, image_data, targets)


def run_job(job: CalibrationJob) -> JobSummary:
    from .cache import PartitionCache
    from .checkpoint import check_compressed_experts, check_compressed_linears, experts_saved_dense, save_quantized
    from .models import checkpoint_dir, load_config, load_model, meta_model
    from .outputs import write_manifest
    from .package import load
    from .preflight import check_job
    from .run.job import open_run
    from .runtime.distributed import distributed_rank, local_batches, main_first, share, synchronize
    from .runtime.selection import quantizable_linears

    start = time.perf_counter()
    check_job(job)  # where it writes, what it reads: before anything loads
    rank, world = distributed_rank()
    is_main = rank == 0
    trust = job.trust_remote_code
    tokenizer = load_tokenizer(job.model_id, job.revision, trust)
    dtype = model_dtype(job.dtype, job.model_id, execution_device(job.options.device), job.revision, trust)
    # Everything that can fail runs on a weightless skeleton first (the package, the format checks, the data):
    # loading a 70B model's weights takes minutes, and a trace failure should not come after them.
    weights = None
    if job.offload == "disk":
        directory = checkpoint_dir(job.model_id, job.revision)
        skeleton = _disk_model(directory, dtype, trust)
        weights = SafetensorsWeights(directory, skeleton)
        traced = meta_model(skeleton.config)
    else:
        skeleton = traced = meta_model(load_config(job.model_id, job.revision, trust))
    options = job.options
    if job.save_format == "compressed" and options.quantize_experts:
        check_compressed_experts(skeleton, options.scheme)  # fail before the calibration, not after it
        dense = experts_saved_dense(skeleton)
        if dense:  # quantized, they would be saved dequantized: the error of W4 at the size of bf16
            import transformers

            logger.warning(
                "%d fused experts modules (%s%s) stay unquantized: transformers %s saves them fused, and "
                "compressed-tensors has no packed format for fused experts, so quantized they would be saved "
                "dequantized, full size. --save-format fake quantizes them (dequantized weights).",
                len(dense),
                dense[0],
                ", ..." if len(dense) > 1 else "",
                transformers.__version__,
            )
            options = dataclasses.replace(options, ignore=(*options.ignore, *(f"^{re.escape(o)}$" for o in dense)))
    batches, emit_options = _calibration_data(job, tokenizer, traced)
    if job.package is not None:
        package, hit = load(job.package), False
        package.check_model(skeleton)  # a package of another model is refused before the weights load
    else:
        with main_first():  # under torchrun: rank 0 emits, the others find the package in the cache
            package, hit = PartitionCache().get_or_emit(traced, emit_options, reemit=job.reemit and is_main)
    if job.save_format == "compressed":  # fail before the calibration, not after it
        check_compressed_linears(
            skeleton, [name for sg in package.subgraphs for name in quantizable_linears(skeleton, sg, options.ignore)]
        )
    samples_per_rank = tuple(
        sum(batches[i]["input_ids"].shape[0] for i in share(len(batches), r, world)) for r in range(world)
    )
    # checkpoints for resuming: one process only (a data-parallel run starts over)
    if job.resume is not None and world > 1:
        raise SeqgenError(
            f"--resume {job.resume}: a data-parallel run writes no checkpoints yet; resume it in one process."
        )
    checkpointer = open_run(job, package, batches) if world == 1 else None
    batches = local_batches(batches)
    model = skeleton if weights is not None else load_model(job.model_id, dtype, job.revision, trust)
    if weights is not None:
        from .checkpoint import StreamingSaver

        # Peak RSS is what disk offload is for: freed activations go back to the OS instead of waiting for reuse
        # (measured on a 1.1B Llama: about 90 MB less at the peak, during GPTQ's largest factorization).
        with (
            StreamingSaver(
                model, weights, job.save_dir, tokenizer=tokenizer, save_format=job.save_format, overwrite=job.overwrite
            )
            if is_main
            else nullcontext()
        ) as saver:
            if checkpointer is not None:
                checkpointer.saver = saver
            result = calibrate(
                model,
                package,
                batches,
                dataclasses.replace(options, reuse_allocations=False),
                weights=weights,
                on_subgraph_done=saver.add if is_main else None,
                keep_results=False,
                checkpoint=checkpointer,
            )
    else:
        result = calibrate(model, package, batches, options, checkpoint=checkpointer)
    if weights is None and is_main:
        save_quantized(
            model,
            result.quantized,
            job.save_dir,
            experts=result.experts,
            tokenizer=tokenizer,
            source_dir=checkpoint_dir(job.model_id, job.revision, weights=False),
            save_format=job.save_format,
            overwrite=job.overwrite,
        )
    if options.observe and is_main:
        from safetensors.torch import save_file

        flat = {
            f"{name}.{key}": value.contiguous()
            for name, stats in result.activation_stats.items()
            for key, value in stats.items()
        }
        partial = job.save_dir / ".activation_stats.safetensors.partial"
        save_file(flat, str(partial))
        partial.rename(job.save_dir / "activation_stats.safetensors")
    if is_main:
        _write_report(job, package, result)
        write_manifest(job.save_dir)  # the statistics and the report are seqgen's output too
    if checkpointer is not None:
        checkpointer.directory.finish()
    synchronize()  # the ranks finish together, once rank 0 has written the checkpoint
    return JobSummary(
        package_path=package.path,
        cache_hit=hit,
        linears=result.linears,
        calibration_seconds=result.seconds,
        total_seconds=time.perf_counter() - start,
        result=result,
        model=model,
        samples_per_rank=samples_per_rank,
        run_dir=None if checkpointer is None else checkpointer.directory.path,
    )


def _write_report(job: CalibrationJob, package: Any, result: CalibrationResult) -> None:
    """``seqgen_report.json`` beside the saved model (see :mod:`seqgen.report`)."""
    from .report import build_report, write_report

    path = write_report(job.save_dir, build_report(job, package, result))
    logger.info("wrote the calibration report %s (`seqgen report %s` shows it)", path, job.save_dir)
