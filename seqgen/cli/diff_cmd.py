"""``seqgen diff A B`` and ``seqgen diff PACKAGE --model M``: what differs between two packages, as text."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from .options import revision_option, trust_remote_code_option
from .output import err, out

_PACKAGE = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command()
@click.argument("package", type=_PACKAGE)
@click.argument("other", type=_PACKAGE, required=False)
@click.option("--model", "model_id", default=None, help="Compare PACKAGE with MODEL emitted now, with its options.")
@revision_option
@trust_remote_code_option
def diff(
    package: Path, other: Path | None, model_id: str | None, revision: str | None, trust_remote_code: bool
) -> None:
    """Compare PACKAGE with OTHER, or with what emitting MODEL under the installed versions gives.

    Prints the fingerprint fields that differ, the subgraphs added, removed or changed, and a unified diff of each
    changed file; no package code runs. Exits 0 when the packages are the same, 1 when they differ and 2 on an error,
    as diff does.
    """
    from ..errors import SeqgenError

    if (other is None) == (model_id is None):
        raise click.UsageError("give either OTHER or --model MODEL, not both or neither.")
    try:
        with tempfile.TemporaryDirectory(prefix="seqgen-diff-") as scratch:
            same = _compare(package, other, model_id, (revision, trust_remote_code), Path(scratch))
    except SeqgenError as exc:
        err(f"error: {exc}", fg="red")
        sys.exit(2)
    sys.exit(0 if same else 1)


def _compare(
    package: Path, other: Path | None, model_id: str | None, source: tuple[str | None, bool], scratch: Path
) -> bool:
    """``source``: the model's revision, and whether to trust its remote code."""
    from ..review import diff_packages, read_package

    ours = read_package(package)
    if other is None:
        from ..emitter import EmitOptions, emit_model
        from ..models import load_config, meta_model

        other = scratch / "emitted"
        emit_model(meta_model(load_config(model_id, *source)), other, EmitOptions.of_package(ours.index))
        labels = (str(package), f"{model_id} now")
    else:
        labels = (str(package), str(other))
    result = diff_packages(ours, read_package(other), labels)
    if result.same:
        out(f"{labels[0]} and {labels[1]} are the same package")
        return True
    for field, a, b in result.fields:
        out(f"fingerprint {field}: {_short(a)} -> {_short(b)}")
    out(
        f"subgraphs: {len(result.changed)} files changed, {len(result.added)} added, {len(result.removed)} removed"
        + "".join(
            f"\n  {sign} {name}" for sign, names in (("+", result.added), ("-", result.removed)) for name in names
        )
    )
    for patch in result.patches:
        out(patch.rstrip("\n"))
    return False


def _short(value: object) -> str:
    """A value for one line: hashes shortened to 12 characters, absent fields as ``-``."""
    if value is None:
        return "-"
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text
