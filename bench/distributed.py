"""Data-parallel calibration on this machine: SmolLM2-135M, GPTQ W4A16 group 64 with exact (fp64-summed) Hessians,
in one process and under torchrun on 2 (or more) gloo ranks, side by side.

Each row is its own launch, so each rank's peak RSS is its own. The wall time is each rank's calibration (the
package lookup plus :func:`seqgen.runtime.calibrate`, model loading and data excluded), the slowest rank's; the
phases are rank 0's. The last column says whether the quantized codes equal the one-process run's bitwise (they
should: the Hessians are summed in fp64, so the split of the batches changes nothing). Every process runs one thread
(torchrun's default): a matmul split over another number of threads may round differently, and one thread per rank
is what makes one process and N ranks compare as 1 core against N. On a machine with fewer cores than ranks, or
shared with other work, the ranks compete for cores, and the speed-up is bounded by that, not by the method.

    python bench/distributed.py [--ranks 1,2] [--num-samples 16] [--seq-len 512] [--batch-size 4] [--runs 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """One rank (or the one process): calibrate its share, write seconds, peak RSS, phases and a digest of codes."""
    from seqgen.algorithms import QuantScheme
    from seqgen.cache import PartitionCache
    from seqgen.data import batches
    from seqgen.emitter import EmitOptions
    from seqgen.job import calibration_samples, load_tokenizer
    from seqgen.models import load_model, meta_model
    from seqgen.runtime import CalibrationOptions, calibrate
    from seqgen.runtime.distributed import join_process_group, local_batches, main_first

    ranks = join_process_group("cpu")
    samples = calibration_samples(load_tokenizer("smollm2-135m"), None, args.seq_len, args.num_samples)
    mine = local_batches(batches(samples, args.batch_size))
    model = load_model("smollm2-135m")
    start = time.perf_counter()
    with main_first():
        package, _ = PartitionCache().get_or_emit(meta_model(model.config), EmitOptions())
    scheme = QuantScheme(bits=4, group_size=64, symmetric=True, act_order=True)
    result = calibrate(model, package, mine, CalibrationOptions(scheme=scheme, exact_hessian=True, device="cpu"))
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name in sorted(result.quantized):
        digest.update(result.quantized[name].codes.numpy().tobytes())
    row = {
        "seconds": seconds,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "samples": sum(batch["input_ids"].shape[0] for batch in mine),
        "phases": result.phase_seconds(),
        "codes": digest.hexdigest(),
    }
    Path(f"{args.out}.{ranks.rank}").write_text(json.dumps(row))


def launch(world: int, args: argparse.Namespace, out: str) -> list[dict]:
    """One run on ``world`` ranks (a plain process for 1): each rank's row."""
    common = [
        "--child",
        "--out",
        out,
        "--num-samples",
        str(args.num_samples),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
    ]
    script = str(Path(__file__).resolve())
    if world == 1:
        command = [sys.executable, script, *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", script]
        command += common
    env = {**os.environ, "PYTHONPATH": str(_REPO), "OMP_NUM_THREADS": "1"}  # torchrun's default for every rank
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=_REPO)
    if proc.returncode != 0:
        sys.exit(f"{world} rank(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2", help="comma-separated numbers of ranks, one row each")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1, help="runs per row; the table shows the median")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    worlds = [int(w) for w in args.ranks.split(",")]
    print(
        f"SmolLM2-135M, GPTQ W4A16 g64 (exact Hessians), {args.num_samples} x {args.seq_len} tokens, batch "
        f"{args.batch_size}, one thread per process, {os.cpu_count()} CPU cores, median of {args.runs} run(s)"
    )
    print(
        f"{'ranks':>5} {'samples/rank':>13} {'wall s':>8} {'speed-up':>8} {'peak RSS MB per rank':>22}  phases (rank 0)"
    )
    base = reference = None
    all_same = True
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            runs = [launch(world, args, f"{tmp}/w{world}r{run}") for run in range(args.runs)]
            wall = statistics.median(max(row["seconds"] for row in ranks) for ranks in runs)
            last = runs[-1]
            base = base or wall
            reference = reference or last[0]["codes"]
            same = all(row["codes"] == reference for row in last)
            all_same = all_same and same
            rss = " / ".join(f"{row['rss_mb']:.0f}" for row in last)
            samples = "/".join(str(row["samples"]) for row in last)
            phases = ", ".join(f"{phase} {s:.1f}s" for phase, s in last[0]["phases"].items())
            print(
                f"{world:>5} {samples:>13} {wall:>8.1f} {base / wall:>7.2f}x {rss:>22}  {phases}"
                f"{'' if same else '  (codes differ from the first row)'}"
            )
    print("codes: bitwise equal in every row" if all_same else "codes: NOT equal in every row")


if __name__ == "__main__":
    main()
