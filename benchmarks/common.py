"""Timing and memory helpers shared by the benchmarks: interleaved medians and peak memory."""
from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping

import torch

from utils import UsageError


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock time covers the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by one call of ``fn``."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(
    candidates: Mapping[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured interleaved.

    After ``warmup`` untimed rounds, each of ``repeats`` rounds runs every candidate once, the order
    reversed on every other round (A B, B A, A B, ...), so slow drifts of the machine (thermal state,
    other processes) fall on all candidates alike instead of on whichever ran last.
    """
    if repeats < 1:
        raise UsageError(f"repeats must be >= 1, got {repeats}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            times[name].append(timed(candidates[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak window (CPU peak RSS cannot be reset; it is read as a running maximum)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def format_bytes(num_bytes: float) -> str:
    """Human-readable size in binary units (``1.50 GiB``)."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"
