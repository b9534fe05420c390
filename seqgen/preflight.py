"""What a calibration job checks before anything loads: where it writes, and the checkpoint files it will read.

A save refused after hours of calibration costs those hours; so does a shard found truncated when its subgraph comes.
:func:`check_job` runs first in :func:`seqgen.job.run_job`, before the tokenizer, the trace or any weight:

- ``--save`` (see :func:`seqgen.outputs.check_output`): not the model's own directory, nor inside or around it; not
  a directory with files seqgen did not write; a previous seqgen output only with ``--overwrite``; writable;
- the model's safetensors files (of a local checkpoint; a hub snapshot's are checked once downloaded, still before
  any tensor is read): present, whole, with readable headers (:mod:`seqgen.checkpoint.validate`);
- ``--spill-dir``: writable, and the spill directories of killed runs in it (``seqgen-intermediates-<pid>-*`` whose
  process is gone) removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint.atomic import remove_debris
from .checkpoint.validate import check_checkpoint_files
from .outputs import check_output, check_writable

if TYPE_CHECKING:
    from .job import CalibrationJob

__all__ = ["check_job", "local_checkpoint"]


def check_job(job: CalibrationJob) -> None:
    """Raise :class:`~seqgen.errors.SeqgenError` (an ``OutputRefused`` or ``BadInput``) for the first problem found."""
    from .runtime.intermediates import SPILL_PREFIX

    source = local_checkpoint(job.model_id)
    check_output(job.save_dir, overwrite=job.overwrite, inputs=[source] if source is not None else [])
    if source is not None:
        check_checkpoint_files(source)
    spill = job.options.spill_dir
    if spill is not None:
        spill = Path(spill)
        if spill.is_dir():
            remove_debris(spill, SPILL_PREFIX)
        check_writable(spill, f"--spill-dir {spill}")


def local_checkpoint(model_id: str) -> Path | None:
    """The checkpoint directory of ``model_id`` when it is on this machine already (a directory, or the converted
    ``smollm2-135m``); ``None`` for a hub id or a ``tiny:`` model."""
    from .models import DEFAULT_MODEL, cache_dir

    if model_id == DEFAULT_MODEL:
        converted = cache_dir() / "models" / DEFAULT_MODEL
        return converted if converted.is_dir() else None
    return Path(model_id) if Path(model_id).is_dir() else None
