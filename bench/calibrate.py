"""Calibration wall time, peak RSS and held-out perplexity: fp, RTN and GPTQ, optionally against llm-compressor's GPTQ
and against an earlier commit of seqgen.

SmolLM2-135M (the embedded default), W4A16, group 64, symmetric (GPTQ with static activation order, the default of
both tools), on seqgen's default full-range grid and on the min-max grid (``-minmax`` rows, llm-compressor's),
64 samples x 512 tokens of the built-in
calibration corpus, perplexity on the built-in held-out corpus. Every run is its own process, so peak RSS is that
run's alone; all runs read the same token tensors. Wall time counts what differs between the tools: seqgen's package
lookup plus calibration, llm-compressor's ``oneshot`` (tracing plus calibration); model loading and data
preparation are excluded for both.

    python bench/calibrate.py [--runs 1] [--rows fp,rtn,gptq,gptq-minmax] [--vs-llmcompressor /path/to/venv/bin/python]
                              [--vs-commit REV]

A row with ``+ckpt`` (``--rows gptq,gptq+ckpt``) writes a checkpoint to a run directory after every subgraph, as
``seqgen calibrate`` does by default; the script then prints checkpointing's cost, that row's wall time against the
row without, per round, and the run directory's size at the end.

llm-compressor pins an older transformers, so it runs from its own venv (``--vs-llmcompressor``). ``--vs-commit REV``
checks REV out into a temporary git worktree and runs its GPTQ row with this venv, each tree with a partition cache of
its own: a before/after comparison of a change, side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]

_PERPLEXITY = r"""
import math, torch
@torch.no_grad()
def heldout_perplexity(model, samples, batch_size=8):
    total, count = 0.0, 0
    for i in range(0, samples.shape[0], batch_size):
        ids = samples[i : i + batch_size]
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + nll.item(), count + ids[:, 1:].numel()
    return math.exp(total / count)
"""

_SEQGEN_CHILD = _PERPLEXITY + r"""
import json, resource, shutil, sys, time
from pathlib import Path
from safetensors.torch import load_file
from seqgen.algorithms import QuantScheme
from seqgen.cache import PartitionCache
from seqgen.emitter import EmitOptions
from seqgen.models import load_model, meta_model
from seqgen.runtime import CalibrationOptions, calibrate
from seqgen.data import batches

row, data_file, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
row, _, extra = row.partition("+")
algorithm, _, grid = row.partition("-")
data = load_file(data_file)
model = load_model("smollm2-135m")
seconds = 0.0
if algorithm != "fp":
    start = time.perf_counter()
    package, _ = PartitionCache().get_or_emit(meta_model(model.config), EmitOptions())
    # the CLI's defaults; a commit from before the grid option computes min-max scales without being told
    grid_option = {"grid": grid} if grid else {}
    scheme = QuantScheme(bits=4, group_size=64, symmetric=True, act_order=algorithm == "gptq", **grid_option)
    options = CalibrationOptions(algorithm=algorithm, scheme=scheme)
    extra_args = {}
    if extra == "ckpt":  # a checkpoint after every subgraph, to a run directory in the temporary directory
        from seqgen.run import Checkpointer, RunDirectory
        run_dir = Path(data_file).parent / f"run-{time.time_ns()}"
        extra_args["checkpoint"] = Checkpointer(RunDirectory.start(run_dir, {"bench": sys.argv[1]}))
    calibrate(model, package, batches(data["calibration"], batch_size), options, **extra_args)
    seconds = time.perf_counter() - start
    if extra == "ckpt":
        checkpoint_mb = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2**20
        shutil.rmtree(run_dir)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result = {"seconds": seconds, "rss_mb": rss, "ppl": heldout_perplexity(model, data["heldout"])}
print(json.dumps(result if extra != "ckpt" else {**result, "checkpoint_mb": checkpoint_mb}))
"""

_LLMCOMPRESSOR_CHILD = _PERPLEXITY + r"""
import json, resource, sys, time, torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

model_dir, data_file = sys.argv[1], sys.argv[2]
data = load_file(data_file)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ids = data["calibration"]
dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                              "group_size": 64}}
recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
start = time.perf_counter()
oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0], pipeline="sequential")
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rss_mb": rss, "ppl": heldout_perplexity(model, data["heldout"])}))
"""


def _child(python: str, code: str, *args: str, env: dict[str, str] | None = None) -> dict[str, float]:
    # `python -c` puts the working directory first on sys.path: run in the tree the child is to import seqgen from
    cwd = None if env is None else env.get("SEQGEN_BENCH_TREE")
    proc = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="rounds (each row once per round); medians shown")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="seqgen samples per forward")
    parser.add_argument("--vs-llmcompressor", metavar="PYTHON", help="python of a venv with llmcompressor installed")
    parser.add_argument(
        "--rows",
        default="fp,rtn,gptq,gptq-minmax",
        help="seqgen rows: fp, ALGORITHM[-GRID][+ckpt] (+ckpt: a checkpoint to a run directory after every subgraph)",
    )
    parser.add_argument("--vs-commit", metavar="REV", help="also run REV's gptq row (a temporary git worktree)")
    args = parser.parse_args()

    from seqgen.models import smollm2_dir

    with tempfile.TemporaryDirectory() as tmp:
        data_file = str(Path(tmp) / "tokens.safetensors")
        write_tokens(data_file, args.num_samples, args.seq_len, args.eval_samples)
        seqgen_args = (sys.executable, _SEQGEN_CHILD)
        plan = {
            f"seqgen {name}": (*seqgen_args, name, data_file, str(args.batch_size)) for name in args.rows.split(",")
        }
        envs = {label: _tree_env(_REPO, Path(tmp) / "cache-head") for label in plan}
        if args.vs_commit:
            label = f"{args.vs_commit} gptq"
            plan[label] = (*seqgen_args, "gptq", data_file, str(args.batch_size))
            envs[label] = _tree_env(_worktree(args.vs_commit, Path(tmp) / "base"), Path(tmp) / "cache-base")
        if args.vs_llmcompressor:
            plan["llm-compressor gptq"] = (args.vs_llmcompressor, _LLMCOMPRESSOR_CHILD, str(smollm2_dir()), data_file)
        # Round by round, every row once per round: a slow spell of the machine hits the rows of a round alike.
        rows: dict[str, list[dict[str, float]]] = {}
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still removes the worktree (finally)
        try:
            for _ in range(args.runs):
                for label, (python, code, *child_args) in plan.items():
                    rows.setdefault(label, []).append(_child(python, code, *child_args, env=envs.get(label)))
        finally:
            if args.vs_commit:
                subprocess.run(["git", "-C", str(_REPO), "worktree", "remove", "--force", str(Path(tmp) / "base")])

    med = {k: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for k, runs in rows.items()}
    fp = med.get("seqgen fp", {}).get("ppl")
    reference = med.get("llm-compressor gptq", {}).get("seconds")
    print(
        f"SmolLM2-135M W4A16 g64 sym, {args.num_samples} x {args.seq_len} calibration tokens, "
        f"{args.eval_samples} x {args.seq_len} held-out; median of {args.runs}"
    )
    print(f"{'row':<22} {'wall s':>8} {'vs llmc':>8} {'peak RSS MB':>12} {'ppl':>9} {'vs fp':>8}")
    for name, m in med.items():
        ratio = f"{m['seconds'] / reference:.2f}x" if reference and m["seconds"] else "-"
        increase = f"{(m['ppl'] / fp - 1) * 100:+.1f}%" if fp else "-"
        print(f"{name:<22} {m['seconds']:>8.1f} {ratio:>8} {m['rss_mb']:>12.0f} {m['ppl']:>9.3f} {increase:>8}")
    for label, runs in rows.items():  # checkpointing's cost: each +ckpt row against its row without
        plain = rows.get(label.removesuffix("+ckpt"))
        if label.endswith("+ckpt") and plain:
            costs = [(a["seconds"] / b["seconds"] - 1) * 100 for a, b in zip(runs, plain, strict=True)]
            print(
                f"checkpointing ({label} vs {label.removesuffix('+ckpt')}): wall time per round "
                f"{', '.join(f'{c:+.1f}%' for c in costs)} (median {statistics.median(costs):+.1f}%), run directory "
                f"{med[label]['checkpoint_mb']:.0f} MB"
            )
    for other in ("llm-compressor gptq", f"{args.vs_commit} gptq"):
        if "seqgen gptq" in rows and other in rows:
            ratios = [a["seconds"] / b["seconds"] for a, b in zip(rows["seqgen gptq"], rows[other], strict=True)]
            print(
                f"seqgen gptq / {other} wall time per round: {', '.join(f'{r:.2f}x' for r in ratios)} "
                f"(median {statistics.median(ratios):.2f}x)"
            )


def write_tokens(path: str, num_samples: int, seq_len: int, eval_samples: int) -> None:
    """The token tensors every row of a run reads: ``calibration`` and ``heldout`` samples of the built-in corpora,
    SmolLM2's tokenizer."""
    from safetensors.torch import save_file

    from seqgen.job import calibration_samples, heldout_samples, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    calibration = calibration_samples(tokenizer, None, seq_len, num_samples)
    save_file({"calibration": calibration, "heldout": heldout_samples(tokenizer, None, seq_len, eval_samples)}, path)


def _worktree(rev: str, path: Path) -> Path:
    """``rev`` checked out at ``path``. Its ``seqgen.templates`` is linked to its own ``templates/``, so that the
    import finds them there before the editable install's mapping to this checkout's."""
    subprocess.run(["git", "-C", str(_REPO), "worktree", "add", "--detach", str(path), rev], check=True)
    (path / "seqgen" / "templates").symlink_to(path / "templates", target_is_directory=True)
    return path


def _tree_env(tree: Path, cache: Path) -> dict[str, str]:
    """The environment of a child that imports seqgen from ``tree``, with a partition cache of its own (two trees
    would otherwise replace each other's packages) that shares the converted models of the user's cache."""
    from seqgen.models import smollm2_dir

    (cache / "models").mkdir(parents=True, exist_ok=True)
    link = cache / "models" / smollm2_dir().name
    if not link.exists():
        link.symlink_to(smollm2_dir(), target_is_directory=True)
    return {**os.environ, "PYTHONPATH": str(tree), "SEQGEN_CACHE": str(cache), "SEQGEN_BENCH_TREE": str(tree)}


if __name__ == "__main__":
    main()
