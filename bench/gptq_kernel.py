"""GPTQ's column loop on a GPU: the Triton kernel (seqgen.algorithms.gptq_kernel) against the torch loop.

For the weight shapes of SmolLM2-135M's layer and of a Llama-3-70B layer (q/k/v and gate/up quantized jointly, as
the runtime does for linears that read one input), quantizes a random weight with GPTQ (W4, group 64, static
activation order) on Hessians of random correlated inputs, both ways, and prints per shape: the median time of
``GPTQ.quantize`` (after one warm-up), the speed-up, the fraction of codes that agree and each path's relative
output error ``||X W^T - X Q^T|| / ||X W^T||``.

    python bench/gptq_kernel.py [--device cuda:0] [--repeats 3] [--small]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SHAPES = {  # name: (rows, columns): [out, in] of the joint weight that one GPTQ solve quantizes
    "smollm2 q+k+v": (576 + 2 * 192, 576),
    "smollm2 o": (576, 576),
    "smollm2 gate+up": (2 * 1536, 576),
    "smollm2 down": (576, 1536),
    "70b q+k+v": (8192 + 2 * 1024, 8192),
    "70b o": (8192, 8192),
    "70b gate+up": (2 * 28672, 8192),
    "70b down": (8192, 28672),
}


def inputs(tokens: int, dim: int, device: torch.device, rank: int = 64) -> torch.Tensor:
    """Tokens with a low-rank-plus-noise covariance, like real activations."""
    g = torch.Generator(device=device).manual_seed(0)
    basis = torch.randn(rank, dim, generator=g, device=device)
    return torch.randn(tokens, rank, generator=g, device=device) @ basis + 0.1 * torch.randn(
        tokens, dim, generator=g, device=device
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="SmolLM2's shapes only")
    args = parser.parse_args()
    device = torch.device(args.device)

    from seqgen.algorithms import QuantScheme, get_algorithm
    from seqgen.algorithms.gptq_kernel import kernel_enabled

    os.environ["SEQGEN_GPTQ_KERNEL"] = "triton"
    if not kernel_enabled(device):
        raise SystemExit(
            f"the Triton kernel does not run on {device}: it needs CUDA and triton "
            "(on the CPU, Triton's interpreter: TRITON_INTERPRET=1)"
        )
    scheme = QuantScheme(bits=4, group_size=64, act_order=True)
    algorithm = get_algorithm("gptq", scheme)
    print(
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; GPTQ W4 g64 act-order; "
        f"median of {args.repeats} after a warm-up"
    )
    print(
        f"{'weight':<16} {'rows x cols':>13} {'torch s':>8} {'kernel s':>9} {'speed-up':>9} {'codes agree':>12} "
        f"{'err torch':>10} {'err kernel':>11}"
    )
    for name, (rows, cols) in SHAPES.items():
        if args.small and not name.startswith("smollm2"):
            continue
        x = inputs(2048, cols, device)
        w = torch.randn(rows, cols, generator=torch.Generator(device=device).manual_seed(1), device=device) * 0.02
        stats = algorithm.new_statistics(cols, device)
        stats.update(x)
        reference = x @ w.T
        seconds, results = {}, {}
        for choice in ("torch", "triton"):
            os.environ["SEQGEN_GPTQ_KERNEL"] = choice
            times = []
            for _ in range(args.repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                q = algorithm.quantize(w, stats)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            seconds[choice], results[choice] = statistics.median(times[1:]), q
        a, b = results["torch"], results["triton"]
        errors = [((reference - x @ q.dequantize().T).norm() / reference.norm()).item() for q in (a, b)]
        agree = (a.codes == b.codes).float().mean().item()
        print(
            f"{name:<16} {f'{rows}x{cols}':>13} {seconds['torch']:>8.3f} {seconds['triton']:>9.3f} "
            f"{seconds['torch'] / seconds['triton']:>8.1f}x {agree:>12.5f} {errors[0]:>10.5f} {errors[1]:>11.5f}"
        )
        del x, w, stats, reference, results, a, b
    os.environ.pop("SEQGEN_GPTQ_KERNEL")


if __name__ == "__main__":
    main()
