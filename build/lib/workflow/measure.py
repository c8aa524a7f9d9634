"""Measuring the benchmark tools' costs: wall time and the peak memory a call adds (CUDA allocator or, on the CPU,
the process's peak resident set)."""
from __future__ import annotations

import gc
import re
import statistics
import time
from pathlib import Path

import torch


def _status_mb(field: str) -> float:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024


def measure_peak(fn, device: str) -> float:
    """Peak memory (MiB) that `fn()` adds above what is allocated when it starts."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
    before = _status_mb("VmRSS")
    fn()
    return max(0.0, _status_mb("VmHWM") - before)


def measure_time(fn, device: str, repeats: int) -> float:
    """Median wall time (ms) of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)
