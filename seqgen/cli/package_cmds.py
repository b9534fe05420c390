"""Commands on an emitted package: ``show``, ``verify``, ``accept``."""

from __future__ import annotations

from pathlib import Path

import click

from .options import revision_option, trust_remote_code_option
from .output import err, out

_PACKAGE = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command()
@click.argument("package", type=_PACKAGE)
def show(package: Path) -> None:
    """Summarize PACKAGE without running any of it: model, fingerprint, subgraphs (runs of layers with one body
    grouped), guards, and files edited or missing since the index was written."""
    from ..review import group_subgraphs, read_package

    text = read_package(package)
    index = text.index
    entries = index["subgraphs"]
    digest = index["fingerprint"]["digest"]
    out(f"{package}: {index['model_class']}, {len(entries)} subgraphs, fingerprint {digest[:16]}")
    out("versions: " + ", ".join(f"{k} {v}" for k, v in index["versions"].items()))
    if "hub" in index["fingerprint"]:
        out(f"emitted from {index['fingerprint']['hub']['id']} at commit {index['fingerprint']['hub']['commit']}")
    out("inputs: " + ", ".join(f"{s['name']} {s['dtype']}{s['shape']}" for s in index["inputs"]))
    for group in group_subgraphs(text):
        entry = entries[group.first]
        modules = ", ".join(entry["modules"]) or "no modules"
        out(f"  {group.label()}" if group.targets else f"  {group.names[0]}: {modules} (not a target)")
        out(f"      in: {', '.join(entry['inputs'])}  out: {', '.join(entry['outputs'])}")
    for i, g in enumerate(index["guards"]):
        out(f"guard {i}: {g['where']} expects {g['expected']!r}: {g['code']}")
    if index.get("edited"):
        out("edited (accepted by hand): " + ", ".join(index["edited"]), fg="yellow")
    if text.edited:
        out(f"changed since the index was written (review, then `seqgen accept {package}`): {', '.join(text.edited)}")
    if text.missing:
        err(f"missing: {', '.join(text.missing)}; re-emit the package", fg="red")


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
@trust_remote_code_option
def verify(
    package: Path,
    model_id: str,
    batch_size: int,
    seq_len: int,
    seed: int,
    revision: str | None,
    trust_remote_code: bool,
) -> None:
    """Check that PACKAGE reproduces the eager model on a random batch (fp32, CPU)."""
    from ..models import load_model
    from ..verify import compare_with_eager

    model = load_model(model_id, revision=revision, trust_remote_code=trust_remote_code)
    diff = compare_with_eager(package, model, batch_size=batch_size, seq_len=seq_len, seed=seed)
    if diff == 0.0:
        out(f"ok: {package} reproduces {type(model).__name__} exactly (max abs diff 0.0)")
    else:
        err(f"MISMATCH: max abs diff of logits {diff:.3e}", fg="red")
        raise SystemExit(1)


COMMANDS = [show, accept, verify]
