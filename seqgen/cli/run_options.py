"""``seqgen calibrate``'s run directory: its options, the job run under stop signals, and what is printed about it.

A stop signal ends the command with 128 + its number (130 for SIGINT, 143 for SIGTERM), no traceback, and the
command that resumes the run.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .output import err, out

if TYPE_CHECKING:
    from ..job import CalibrationJob, JobSummary

__all__ = ["report_run_dir", "run_dir_options", "run_resumable"]


def run_dir_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``--run-dir``, ``--resume`` and ``--checkpoint-every``."""
    options = [
        click.option(
            "--run-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Where checkpoints between subgraphs go, for --resume. Default: $SEQGEN_CACHE/runs/<job "
            "fingerprint> (printed at the start).",
        ),
        click.option(
            "--resume",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            default=None,
            metavar="RUN_DIR",
            help="Continue a killed or stopped run from its run directory's latest checkpoint (the same command, "
            "options and inputs as that run).",
        ),
        click.option(
            "--checkpoint-every",
            type=click.IntRange(min=0),
            default=1,
            metavar="N",
            help="Write a checkpoint after every N subgraphs (and after the last); 0: no checkpoints, no run "
            "directory.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def run_resumable(job: CalibrationJob) -> JobSummary:
    """Run ``job``; on SIGINT or SIGTERM print how to resume it and exit with 128 + the signal's number."""
    from ..job import run_job
    from ..run import Interrupted, stop_signals

    with stop_signals():
        try:
            return run_job(job)
        except Interrupted as stop:
            err(f"stopped by {stop}.", fg="yellow")
            if stop.run_dir is not None:
                err(f"resume with: {resume_command(stop.run_dir)}")
            else:
                err("no checkpoint was written yet: run the command again to start over.")
            sys.exit(stop.exit_code)


def resume_command(run_dir: Path) -> str:
    """This process's command line with ``--resume RUN_DIR`` in place of any ``--run-dir``/``--resume``."""
    args, kept = sys.argv[1:], []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--run-dir", "--resume"):
            skip = True
        elif not arg.startswith(("--run-dir=", "--resume=")):
            kept.append(arg)
    return shlex.join(["seqgen", *kept, "--resume", str(run_dir)])


def report_run_dir(summary: JobSummary) -> None:
    """The finished run's directory, and how to delete it."""
    if summary.run_dir is None:
        return
    size = sum(f.stat().st_size for f in summary.run_dir.rglob("*") if f.is_file())
    out(
        f"run directory {summary.run_dir} ({size / 2**20:.1f} MiB) is no longer needed: delete it with "
        f"`rm -r {shlex.quote(str(summary.run_dir))}`, or all finished runs with `seqgen cache prune`."
    )
