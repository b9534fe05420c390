"""The run directory of a ``seqgen calibrate`` job: started, or resumed with ``--resume``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import SeqgenError
from . import signals
from .checkpointer import Checkpointer
from .directory import RunDirectory, default_run_dir
from .fingerprint import job_fingerprint

if TYPE_CHECKING:
    from ..job import CalibrationJob
    from ..package import Package

__all__ = ["open_run"]

logger = logging.getLogger(__name__)


def open_run(job: CalibrationJob, package: Package, batches: Sequence[Mapping[str, Any]]) -> Checkpointer | None:
    """The checkpointer of ``job`` (None with ``checkpoint_every=0``): its run directory is ``job.resume`` (checked
    against the job's fingerprint), ``job.run_dir`` or the default under ``$SEQGEN_CACHE/runs``."""
    if job.checkpoint_every < 0:
        raise SeqgenError(f"checkpoint_every must be >= 0 (0: no checkpoints), got {job.checkpoint_every}.")
    if job.checkpoint_every == 0:
        if job.resume is not None:
            raise SeqgenError("--resume continues from checkpoints, which --checkpoint-every 0 turns off; drop one.")
        return None
    if job.resume is not None and job.run_dir is not None and job.resume != job.run_dir:
        raise SeqgenError("--resume names the run directory already; drop --run-dir.")
    fingerprint = job_fingerprint(job, package, batches)
    if job.resume is not None:
        directory = RunDirectory.resume(job.resume, fingerprint)
        if directory.manifest() is not None:  # a stop signal from here on is resumed from it
            signals.note_checkpoint(directory.path)
    else:
        directory = RunDirectory.start(job.run_dir or default_run_dir(fingerprint), fingerprint)
    logger.info("run directory: %s (checkpoint every %d subgraphs)", directory.path, job.checkpoint_every)
    return Checkpointer(directory, job.checkpoint_every)
