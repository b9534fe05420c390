"""Commands on an emitted package: ``show``, ``verify``, ``accept``."""

from __future__ import annotations

from pathlib import Path

import click

from .options import revision_option
from .output import err, out

_PACKAGE = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command()
@click.argument("package", type=_PACKAGE)
def show(package: Path) -> None:
    """Summarize PACKAGE: model, fingerprint, subgraphs, guards and hand-edited files."""
    from ..package import load

    pkg = load(package, verify=False)
    index = pkg.index
    out(f"{package}: {index['model_class']}, {len(pkg.subgraphs)} subgraphs, fingerprint {pkg.fingerprint[:16]}")
    out("versions: " + ", ".join(f"{k} {v}" for k, v in index["versions"].items()))
    out("inputs: " + ", ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in index["inputs"]))
    for sg in pkg.subgraphs:
        what = ", ".join(sg.targets) or ("head" if sg.index == 0 else "tail")
        out(f"  {sg.name}  {what:<24} in: {', '.join(sg.inputs)}  out: {', '.join(sg.outputs)}")
    for i, g in enumerate(index["guards"]):
        out(f"guard {i}: {g['where']} expects {g['expected']!r}: {g['code']}")
    if pkg.edited_files:
        out("edited (accepted by hand): " + ", ".join(pkg.edited_files), fg="yellow")


@click.command()
@click.argument("package", type=_PACKAGE)
def accept(package: Path) -> None:
    """Trust the current content of PACKAGE's files after reviewing a hand edit."""
    from ..package import accept as accept_package

    changed = accept_package(package)
    if changed:
        out(f"accepted {len(changed)} edited file(s): {', '.join(changed)}")
    else:
        out("nothing to accept: every file matches the index")


@click.command()
@click.argument("package", type=_PACKAGE)
@click.option("--model", "model_id", required=True, help="Model id or directory whose weights to run.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2)
@click.option("--seq-len", type=click.IntRange(min=1), default=32)
@click.option("--seed", type=int, default=0)
@revision_option
def verify(package: Path, model_id: str, batch_size: int, seq_len: int, seed: int, revision: str | None) -> None:
    """Check that PACKAGE reproduces the eager model on a random batch (fp32, CPU)."""
    from ..models import load_model
    from ..verify import compare_with_eager

    model = load_model(model_id, revision=revision)
    diff = compare_with_eager(package, model, batch_size=batch_size, seq_len=seq_len, seed=seed)
    if diff == 0.0:
        out(f"ok: {package} reproduces {type(model).__name__} exactly (max abs diff 0.0)")
    else:
        err(f"MISMATCH: max abs diff of logits {diff:.3e}", fg="red")
        raise SystemExit(1)


COMMANDS = [show, accept, verify]
