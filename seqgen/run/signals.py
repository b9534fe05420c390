"""SIGINT and SIGTERM during a calibration: stop at the next safe point with a checkpoint, not in the middle.

Inside :func:`stop_signals` (the ``seqgen calibrate`` command runs the job in it), the first SIGINT or SIGTERM that
arrives while a checkpointed calibration runs is only noted: the subgraph in flight finishes, a checkpoint is written
and :class:`Interrupted` is raised there (see :class:`seqgen.run.Checkpointer`). A second signal, or one that arrives
outside the calibration loop (loading, saving), raises :class:`Interrupted` at once; whatever was being written is
removed on the way out (atomic directories), and the latest checkpoint stays as it was.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Interrupted", "note_checkpoint", "safe_points", "stop_requested", "stop_signals"]

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict[str, object] = {"requested": None, "deferring": False, "checkpoint": None}


class Interrupted(KeyboardInterrupt):
    """The job stopped on ``signum``; ``run_dir`` holds its latest checkpoint (None: nothing to resume)."""

    def __init__(self, signum: int, run_dir: Path | None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir = run_dir

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended: 130 SIGINT, 143 SIGTERM."""
        return 128 + self.signum


def _handler(signum: int, frame: object) -> None:
    if _state["deferring"] and _state["requested"] is None:
        _state["requested"] = signum
        logger.warning(
            "%s: stopping after the subgraph in flight, with a checkpoint (send it again to stop now and lose that "
            "subgraph)",
            signal.Signals(signum).name,
        )
        return
    raise Interrupted(signum, _state["checkpoint"])  # type: ignore[arg-type]


@contextmanager
def stop_signals() -> Iterator[None]:
    """Handle SIGINT and SIGTERM as the module docstring says, in this block (main thread only)."""
    previous = {signum: signal.signal(signum, _handler) for signum in _SIGNALS}
    _state.update(requested=None, deferring=False, checkpoint=None)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _state.update(requested=None, deferring=False, checkpoint=None)


def safe_points(active: bool) -> None:
    """Say whether a checkpointed calibration loop is running, whose next safe point a first signal waits for."""
    _state["deferring"] = active


def stop_requested() -> int | None:
    """The signal that asked the job to stop at the next safe point, if one did."""
    return _state["requested"]  # type: ignore[return-value]


def note_checkpoint(run_dir: Path) -> None:
    """``run_dir`` now holds a complete checkpoint: an interruption from here on can be resumed from it."""
    _state["checkpoint"] = run_dir
