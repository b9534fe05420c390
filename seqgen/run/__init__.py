"""Crash-safe, resumable calibration: run directories, checkpoints between subgraphs, stop signals.

==================  ===============================================================================================
``fingerprint.py``  what a job is made of (model files, package, data, options, versions), compared on resume
``directory.py``    :class:`RunDirectory`: the layout, the manifest written last, locking, pruning
``records.py``      a checkpoint's files: quantized weights and statistics in safetensors, hard links
``checkpointer.py`` :class:`Checkpointer`: what is written after a subgraph, and restored before a resumed run
``signals.py``      SIGINT and SIGTERM stop at the next safe point, with a checkpoint
``job.py``          :func:`open_run`: the run directory and checkpointer of a ``seqgen calibrate`` job
==================  ===============================================================================================
"""

from .checkpointer import Checkpointer
from .directory import RunDirectory, default_run_dir, prune_runs, runs_root
from .fingerprint import JobFingerprint, differences, job_fingerprint
from .signals import Interrupted, stop_signals

__all__ = [
    "Checkpointer",
    "Interrupted",
    "JobFingerprint",
    "RunDirectory",
    "default_run_dir",
    "differences",
    "job_fingerprint",
    "prune_runs",
    "runs_root",
    "stop_signals",
]
