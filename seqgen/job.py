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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import SafetensorsWeights
from .choices import DType, Offload, SaveFormat
from .errors import SeqgenError
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
    options: CalibrationOptions = field(default_factory=CalibrationOptions)
    # checkpoints for resuming (seqgen.run): the run directory (default under $SEQGEN_CACHE/runs), a killed run's
    # run directory to continue, and the subgraphs between checkpoints (0: none)
    run_dir: Path | None = None
    resume: Path | None = None
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        """Plain strings become enum members; a value that is not a choice, or an unregistered algorithm, raises
        SeqgenError here rather than after the model has loaded."""
        from .algorithms import ALGORITHMS, get_algorithm

        object.__setattr__(self, "offload", Offload.parse(self.offload, "CalibrationJob.offload"))
        object.__setattr__(self, "save_format", SaveFormat.parse(self.save_format, "CalibrationJob.save_format"))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", DType.parse(self.dtype, "CalibrationJob.dtype"))
        if self.options.algorithm not in ALGORITHMS:
            get_algorithm(self.options.algorithm, self.options.scheme)  # raises, naming the registered algorithms


@dataclass
class JobSummary:
    package_path: Path
    cache_hit: bool
    linears: int
    calibration_seconds: float
    total_seconds: float
    result: CalibrationResult
    model: torch.nn.Module  # quantized in place (in disk mode: the skeleton, weights released)
    run_dir: Path | None = None  # the run directory of the finished run (None without checkpoints)


def load_tokenizer(model_id: str, revision: str | None = None) -> Any:
    """The checkpoint's tokenizer. A vision-language checkpoint may keep its chat template with the processor
    (``chat_template.jinja``, or ``chat_template.json``) rather than the tokenizer: the tokenizer then gets it, so
    chat-formatted calibration data is rendered as the model was trained."""
    import json

    from transformers import AutoTokenizer

    from .models import checkpoint_dir

    directory = checkpoint_dir(model_id, revision, weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise SeqgenError(f"{directory} has no usable tokenizer ({exc}); save one with the model.") from exc
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
    name: DType | str | None, model_id: str, device: torch.device, revision: str | None = None
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

    stored = getattr(load_config(model_id, revision), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) and stored.is_floating_point else torch.float32


def _disk_model(directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The model skeleton: parameters on meta, buffers real (non-persistent ones such as rotary tables)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .models import model_from_config

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = model_from_config(config, dtype)
    model.tie_weights()  # as from_pretrained does: tied weights are one parameter, stored under one name
    return model.eval()


def run_job(job: CalibrationJob) -> JobSummary:
    from .cache import PartitionCache
    from .checkpoint import check_compressed_experts, check_compressed_linears, experts_saved_dense, save_quantized
    from .data import batches as make_batches
    from .emitter import EmitOptions
    from .models import checkpoint_dir, load_config, load_model, meta_model
    from .package import load
    from .run.job import open_run
    from .runtime.selection import quantizable_linears

    start = time.perf_counter()
    tokenizer = load_tokenizer(job.model_id, job.revision)
    dtype = model_dtype(job.dtype, job.model_id, execution_device(job.options.device), job.revision)
    # Everything that can fail runs on a weightless skeleton first (the package, the format checks, the data):
    # loading a 70B model's weights takes minutes, and a trace failure should not come after them.
    weights = None
    if job.offload == "disk":
        directory = checkpoint_dir(job.model_id, job.revision)
        skeleton = _disk_model(directory, dtype)
        weights = SafetensorsWeights(directory, skeleton)
        traced = meta_model(skeleton.config)
    else:
        skeleton = traced = meta_model(load_config(job.model_id, job.revision))
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
    if job.package is not None:
        package, hit = load(job.package), False
        package.check_model(skeleton)  # a package of another model is refused before the weights load
    else:
        package, hit = PartitionCache().get_or_emit(traced, EmitOptions(), reemit=job.reemit)
    if job.save_format == "compressed":  # fail before the calibration, not after it
        check_compressed_linears(
            skeleton, [name for sg in package.subgraphs for name in quantizable_linears(skeleton, sg, options.ignore)]
        )
    samples = calibration_samples(tokenizer, job.dataset, job.seq_len, job.num_samples)
    batches = make_batches(samples, job.batch_size)
    checkpointer = open_run(job, package, samples)
    model = skeleton if weights is not None else load_model(job.model_id, dtype, job.revision)
    if weights is not None:
        from .checkpoint import StreamingSaver

        # Peak RSS is what disk offload is for: freed activations go back to the OS instead of waiting for reuse
        # (measured on a 1.1B Llama: about 90 MB less at the peak, during GPTQ's largest factorization).
        with StreamingSaver(model, weights, job.save_dir, tokenizer=tokenizer, save_format=job.save_format) as saver:
            if checkpointer is not None:
                checkpointer.saver = saver
            result = calibrate(
                model,
                package,
                batches,
                dataclasses.replace(options, reuse_allocations=False),
                weights=weights,
                on_subgraph_done=saver.add,
                keep_results=False,
                checkpoint=checkpointer,
            )
    else:
        result = calibrate(model, package, batches, options, checkpoint=checkpointer)
        save_quantized(
            model,
            result.quantized,
            job.save_dir,
            experts=result.experts,
            tokenizer=tokenizer,
            source_dir=checkpoint_dir(job.model_id, job.revision, weights=False),
            save_format=job.save_format,
        )
    if options.observe:
        from safetensors.torch import save_file

        flat = {
            f"{name}.{key}": value.contiguous()
            for name, stats in result.activation_stats.items()
            for key, value in stats.items()
        }
        save_file(flat, str(job.save_dir / "activation_stats.safetensors"))
    if checkpointer is not None:
        checkpointer.directory.finish()
    return JobSummary(
        package_path=package.path,
        cache_hit=hit,
        linears=result.linears,
        calibration_seconds=result.seconds,
        total_seconds=time.perf_counter() - start,
        result=result,
        model=model,
        run_dir=None if checkpointer is None else checkpointer.directory.path,
    )
