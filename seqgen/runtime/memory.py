"""Process memory policy for CPU calibration (glibc only; a no-op elsewhere).

glibc serves allocations above its mmap threshold with a fresh ``mmap`` and unmaps them on free, so every large
activation a CPU forward creates (a ``[8, 512, 1536]`` fp32 tensor is 25 MB) is page-faulted and zeroed anew:
measured on SmolLM2's decoder layer, 25-35% of the forward's time. Raising the threshold to glibc's maximum (32 MiB)
and keeping freed heap up to a trim threshold lets such buffers be reused instead. The policy is process-wide and
stays in force after calibration; :func:`release_free_memory` hands freed heap back to the OS (after each subgraph
in disk-offload runs, whose peak RSS is the point).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import resource
import sys

import torch

__all__ = ["reuse_large_allocations", "release_free_memory", "reset_device_peak", "device_peak", "rss_peak"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 128 * 1024 * 1024


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl and other libcs
    except (OSError, AttributeError):
        return None
    return libc


def reuse_large_allocations() -> bool:
    """Make glibc reuse freed buffers of up to 32 MiB instead of unmapping them; True if the policy is in force."""
    libc = _glibc()
    if libc is None:
        return False
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    logger.debug("malloc: mmap threshold %d, trim threshold %d: %s", MMAP_THRESHOLD, TRIM_THRESHOLD, applied)
    return applied


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (``malloc_trim(0)``), so RSS drops to what is live."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def reset_device_peak(device: torch.device) -> None:
    """Start measuring :func:`device_peak` afresh (CUDA; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: torch.device) -> int | None:
    """Bytes of CUDA memory allocated at most since :func:`reset_device_peak`; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def rss_peak() -> int:
    """The process's peak resident set so far, in bytes (``ru_maxrss``: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
