"""A calibration job's fingerprint: what must be equal for a checkpoint of one run to be resumed by another.

Fields (each a JSON value, compared one by one so that a refused resume names what differs):

===========  ======================================================================================================
``model``    the model id and revision, the sha256 of its config, and of each weight file its name, size and the
             sha256 of its first and last MiB (the safetensors header and the last tensors; hashing a 140 GB
             checkpoint whole would take minutes)
``package``  the package's fingerprint and the sha256 of its index (which holds the sha256 of every file)
``data``     the sha256 and shape of the calibration token ids (the dataset, tokenizer, sample count and length
             as they came out)
``options``  every job and calibration option that can change the result (not where files go: ``--save``,
             ``--spill-dir``, the run directory, the checkpoint interval; nor ``prefetch``)
``versions`` seqgen, torch, transformers, safetensors, compressed-tensors
===========  ======================================================================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..job import CalibrationJob
    from ..package import Package

__all__ = ["JobFingerprint", "differences", "fingerprint_digest", "job_fingerprint"]

#: ``{field: JSON value}``, see the module docstring
JobFingerprint = dict[str, Any]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SAMPLED_BYTES = 1 << 20
# CalibrationJob and CalibrationOptions fields that say where files go or how fast the job runs, not what it computes
# (the model and the data have fields of their own)
_NOT_FINGERPRINTED = {
    *("model_id", "revision", "dataset", "save_dir", "package", "reemit"),
    *("run_dir", "resume", "checkpoint_every", "spill_dir", "prefetch"),
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _sampled_digest(path: Path) -> str:
    """sha256 of the file's first and last MiB (all of it when smaller than 2 MiB)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_SAMPLED_BYTES))
        if size > _SAMPLED_BYTES:
            f.seek(max(_SAMPLED_BYTES, size - _SAMPLED_BYTES))
            digest.update(f.read())
    return digest.hexdigest()


def _model_field(job: CalibrationJob) -> dict[str, Any]:
    from ..models import checkpoint_dir, load_config

    config = load_config(job.model_id, job.revision, job.trust_remote_code)
    field: dict[str, Any] = {
        "id": job.model_id,
        "revision": job.revision,
        "config": _sha256(_canonical(config.to_dict()).encode()),
    }
    if not job.model_id.startswith("tiny:"):  # a tiny random model has no files: its config is all of it
        directory = checkpoint_dir(job.model_id, job.revision)
        field["weights"] = {
            path.name: [path.stat().st_size, _sampled_digest(path)]
            for path in sorted(directory.iterdir())
            if path.is_file() and path.suffix in _WEIGHT_SUFFIXES
        }
    return field


def _options_field(job: CalibrationJob) -> dict[str, Any]:
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in _NOT_FINGERPRINTED}
    options = fields.pop("options")
    fields.update({f.name: getattr(options, f.name) for f in dataclasses.fields(options)})
    fields["scheme"] = dataclasses.asdict(fields["scheme"])
    return {name: value for name, value in json.loads(_canonical(fields)).items() if name not in _NOT_FINGERPRINTED}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from ..index import current_versions

    versions = dict(current_versions())
    for name in ("safetensors", "compressed-tensors"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def job_fingerprint(job: CalibrationJob, package: Package, batches: Sequence[Mapping[str, Any]]) -> JobFingerprint:
    """The fingerprint of ``job``, calibrated with ``package`` on ``batches`` (token ids, and images where the data
    has them: every tensor of every batch, in order)."""
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            value = batch[name]
            if isinstance(value, torch.Tensor):
                digest.update(f"{name}:{value.dtype}:{list(value.shape)};".encode())
                digest.update(value.contiguous().cpu().numpy().tobytes())
    return {
        "model": _model_field(job),
        "package": {"fingerprint": package.fingerprint, "index": _sha256(_canonical(package.index).encode())},
        "data": {"batches": len(batches), "sha256": digest.hexdigest()},
        "options": _options_field(job),
        "versions": _versions(),
    }


def fingerprint_digest(fingerprint: JobFingerprint) -> str:
    """The sha256 of the whole fingerprint (the default run directory is named by its first 16 digits)."""
    return _sha256(_canonical(fingerprint).encode())


def differences(stored: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The fields (``options.num_samples``, ``model.weights``, ...) whose values differ, with both values when they
    are short."""
    found = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if old == new:
            continue
        name = f"{prefix}{key}"
        if isinstance(old, Mapping) and isinstance(new, Mapping) and key != "weights":
            found += differences(old, new, f"{name}.")
        elif len(_canonical(old)) + len(_canonical(new)) <= 80:
            found.append(f"{name} ({_canonical(old)} then, {_canonical(new)} now)")
        else:
            found.append(name)
    return found
