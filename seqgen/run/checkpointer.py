"""Checkpoints of a calibration between subgraphs, and resuming from them.

:class:`Checkpointer` hooks into :func:`seqgen.runtime.calibrate`: :meth:`~Checkpointer.restore` before the first
subgraph, :meth:`~Checkpointer.after_subgraph` after each. What it writes is what
:class:`~seqgen.runtime.state.CalibrationState` holds, the state one subgraph hands the next:

* the quantized weights of the subgraphs done (only those since the previous checkpoint are written each time). On
  resume they are written back into the freshly loaded model, dequantized, as compressing wrote them; with weights
  offloaded to disk the streaming save's finished shards are kept instead (and the shapes it needs for the
  ``quantization_config``);
* the values that flow into the next subgraph, for every batch (the boundary);
* the results' bookkeeping (reports, linears left unquantized, activation statistics) and the torch RNG state.

The run resumes bitwise: the next subgraph sees the same weights, inputs and state as in an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SeqgenError
from ..faults import fault_point
from ..runtime.intermediates import template_from_json, template_to_json, unflatten, value_file_name
from ..runtime.state import SubgraphReport
from . import signals
from .directory import RunDirectory
from .records import link_or_copy, load_quantized, load_stats, save_quantized_groups, save_stats, save_tensors

if TYPE_CHECKING:
    from ..checkpoint import StreamingSaver
    from ..runtime.state import CalibrationRun, CalibrationState

__all__ = ["Checkpointer"]

logger = logging.getLogger(__name__)


class Checkpointer:
    """Writes a checkpoint to ``directory`` after every ``every`` subgraphs, after the last one, and when a stop
    signal asked for one (see :mod:`seqgen.run.signals`); restores the latest one before a resumed run continues.
    ``saver`` is the streaming save of a run with weights offloaded to disk."""

    def __init__(self, directory: RunDirectory, every: int = 1, saver: StreamingSaver | None = None) -> None:
        if every < 1:
            raise SeqgenError(f"checkpoints are written every N subgraphs, N >= 1; got {every}.")
        self.directory = directory
        self.every = every
        self.saver = saver
        self._files: set[str] = set()  # written by earlier checkpoints and kept: weights, statistics, shards
        self._saved: set[str] = set()  # quantized weights and statistics in those files, by group and name

    def __enter__(self) -> Checkpointer:
        """The calibration loop runs in this block: a first stop signal waits for its next safe point."""
        signals.safe_points(True)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """Stop signals act at once again. A loop that failed releases the run directory (its latest checkpoint
        stays, for ``--resume``); one that finished keeps it for the save (:meth:`RunDirectory.finish`)."""
        signals.safe_points(False)
        if exc_type is not None:
            self.directory.close()

    # ---- writing -------------------------------------------------------------------------------------------------

    def after_subgraph(self, run: CalibrationRun, state: CalibrationState) -> None:
        """Write a checkpoint when one is due; then, if a signal asked the job to stop, raise
        :class:`~seqgen.run.signals.Interrupted`."""
        last = state.next_subgraph == len(run.subgraphs)
        stop = signals.stop_requested()
        if stop is not None or last or state.next_subgraph % self.every == 0:
            self.write(run, state)
        if stop is not None:
            raise signals.Interrupted(stop, self.directory.path)

    def write(self, run: CalibrationRun, state: CalibrationState) -> None:
        """Write the checkpoint of ``state`` (the next subgraph's state). A failure leaves the previous one as it
        was, and an ``OSError`` (a full disk) becomes an error that says so."""
        saved: set[str] = set()  # what the new files hold, recorded once they are part of a checkpoint
        try:
            files = self._write_weights(state, saved) | self._write_shards() | self._write_stats(state, saved)
            boundary, values = self._write_boundary(run, state)
            fault_point("checkpoint")
            self.directory.commit(self._files | files | boundary, self._state(run, state, values))
        except OSError as exc:
            self.directory.abandon()
            raise SeqgenError(
                f"could not write the checkpoint after subgraph {state.next_subgraph} to {self.directory.path}: "
                f"{exc.strerror or exc}. The previous checkpoint is intact: free space there (or pass another "
                f"--run-dir, or --checkpoint-every 0) and continue with --resume {self.directory.path}."
            ) from exc
        except BaseException:
            self.directory.abandon()
            raise
        self._files |= files
        self._saved |= saved
        signals.note_checkpoint(self.directory.path)

    def _write_weights(self, state: CalibrationState, saved: set[str]) -> set[str]:
        if self.saver is not None:  # disk offload: the shards hold the weights, only their shapes are needed
            linears, experts = self.saver.shapes, self.saver.expert_shapes
        else:
            linears, experts = state.result.quantized, state.result.experts
        groups = {
            group: {name: w for name, w in weights.items() if f"{group}/{name}" not in self._saved}
            for group, weights in (("linears", linears), ("experts", experts))
        }
        if not any(groups.values()):
            return set()
        name = f"weights/{state.next_subgraph:05d}.safetensors"
        save_quantized_groups(groups, self.directory.path / name)
        saved.update(f"{group}/{key}" for group, weights in groups.items() for key in weights)
        return {name}

    def _write_shards(self) -> set[str]:
        if self.saver is None:
            return set()
        names = set()
        for shard in sorted(set(self.saver.weight_map.values())):
            name = f"shards/{shard}"
            if name not in self._files:
                link_or_copy(self.saver.tmp / shard, self.directory.path / name)
            names.add(name)
        return names

    def _write_stats(self, state: CalibrationState, saved: set[str]) -> set[str]:
        new = {k: v for k, v in state.result.activation_stats.items() if f"stats/{k}" not in self._saved}
        if not new:
            return set()
        name = f"stats/{state.next_subgraph:05d}.safetensors"
        save_stats(new, self.directory.path / name)
        saved.update(f"stats/{k}" for k in new)
        return {name}

    def _write_boundary(
        self, run: CalibrationRun, state: CalibrationState
    ) -> tuple[set[str], list[dict[str, Any]] | None]:
        """The values flowing into the next subgraph, one file per batch and value (spilled values are linked)."""
        folder = f"boundary-{state.next_subgraph:05d}"
        names: set[str] = set()
        values: list[dict[str, Any]] = []
        if state.next_subgraph == len(run.subgraphs):  # no subgraph reads them: only the save is left
            return names, None
        for i in range(len(state.cache)):
            values.append({})
            for value, (template, tensors) in state.cache.export(i).items():
                name = f"{folder}/{value_file_name(i, value)}"
                values[i][value] = template_to_json(template, value)
                if isinstance(tensors, Path):
                    link_or_copy(tensors, self.directory.path / name)
                else:
                    save_tensors(tensors, self.directory.path / name)
                names.add(name)
        return names, values

    def _state(self, run: CalibrationRun, state: CalibrationState, values: list[dict[str, Any]] | None) -> dict:
        result = state.result
        rng = {"torch": torch.get_rng_state().numpy().tobytes().hex()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
        saver = None
        if self.saver is not None:
            saver = {
                "weight_map": self.saver.weight_map,
                "packed": sorted(self.saver.packed),
                "tmp": str(self.saver.tmp),
            }
        return {
            "next_subgraph": state.next_subgraph,
            "subgraphs": len(run.subgraphs),
            "result": {
                "reports": [dataclasses.asdict(r) for r in result.reports],
                "linears": result.linears,
                "unquantized": result.unquantized,
                "round_to_nearest": result.round_to_nearest,
                "warned": sorted(state.warned),
            },
            "values": values,
            "saver": saver,
            "rng": rng,
        }

    # ---- resuming ------------------------------------------------------------------------------------------------

    def restore(self, run: CalibrationRun, state: CalibrationState) -> None:
        """Bring ``state``, the model and the streaming save to the latest checkpoint (nothing to do before the
        first)."""
        manifest = self.directory.manifest()
        if manifest is None:
            return
        if manifest["subgraphs"] != len(run.subgraphs) or len(manifest["values"] or state.cache) != len(state.cache):
            raise SeqgenError(
                f"the checkpoint in {self.directory.path} is of {manifest['subgraphs']} subgraphs, this run has "
                f"{len(run.subgraphs)} (or another number of batches); delete it and start over."
            )
        files = sorted(manifest["files"])
        self._files = {name for name in files if not name.startswith("boundary-")}
        for name in files:
            if name.startswith("weights/"):
                self._restore_weights(run, state, self.directory.path / name)
            elif name.startswith("stats/"):
                stats = load_stats(self.directory.path / name)
                state.result.activation_stats.update(stats)
                self._saved.update(f"stats/{k}" for k in stats)
            elif name.startswith("shards/") and self.saver is not None:
                link_or_copy(self.directory.path / name, self.saver.tmp / name.removeprefix("shards/"))
        if self.saver is not None:
            self.saver.weight_map.update(manifest["saver"]["weight_map"])
            self.saver.packed.update(manifest["saver"]["packed"])
            _remove_killed_save(Path(manifest["saver"]["tmp"]), self.saver.tmp)
        if manifest["values"] is not None:
            self._restore_boundary(state, manifest)
        self._restore_bookkeeping(state, manifest)
        logger.info("resuming %s at subgraph %d of %d", self.directory.path, state.next_subgraph, len(run.subgraphs))
        signals.note_checkpoint(self.directory.path)

    def _restore_weights(self, run: CalibrationRun, state: CalibrationState, path: Path) -> None:
        from ..checkpoint import apply_fake_quant

        groups = load_quantized(path)
        linears, experts = groups["linears"], groups["experts"]
        self._saved.update(f"{group}/{key}" for group, weights in groups.items() for key in weights)
        if self.saver is not None:
            self.saver.shapes.update(linears)
            self.saver.expert_shapes.update(experts)
            return
        apply_fake_quant(run.model, linears, experts=experts)  # what compressing wrote into the weights
        if run.keep_results:
            state.result.quantized.update(linears)
            state.result.experts.update(experts)

    def _restore_boundary(self, state: CalibrationState, manifest: dict[str, Any]) -> None:
        from safetensors.torch import load_file

        folder = self.directory.path / f"boundary-{manifest['next_subgraph']:05d}"
        for i, templates in enumerate(manifest["values"]):
            values = {
                name: unflatten(template_from_json(template), load_file(str(folder / value_file_name(i, name))))
                for name, template in templates.items()
            }
            state.cache.restore(i, values)

    def _restore_bookkeeping(self, state: CalibrationState, manifest: dict[str, Any]) -> None:
        result, saved = state.result, manifest["result"]
        result.reports = [SubgraphReport.from_dict(report) for report in saved["reports"]]
        result.linears = saved["linears"]
        result.unquantized = list(saved["unquantized"])
        result.round_to_nearest = list(saved["round_to_nearest"])
        state.warned = set(saved["warned"])
        state.next_subgraph = manifest["next_subgraph"]
        rng = manifest["rng"]
        torch.set_rng_state(torch.frombuffer(bytearray.fromhex(rng["torch"]), dtype=torch.uint8))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(
                [torch.frombuffer(bytearray.fromhex(s), dtype=torch.uint8) for s in rng["cuda"]]
            )


def _remove_killed_save(tmp: Path, current: Path) -> None:
    """Delete the streaming save that the killed run was writing beside ``--save`` (``.NAME.tmp-*``): its finished
    shards are in the run directory, linked into the new one."""
    if tmp != current and tmp.name.startswith(f".{current.name.split('.tmp-')[0].lstrip('.')}.tmp-"):
        shutil.rmtree(tmp, ignore_errors=True)
