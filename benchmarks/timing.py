"""Wall-clock timing shared by the benchmarks: synchronise the GPU around each call so the time is the
work's, not the launch's."""

from __future__ import annotations

import time

import torch


def time_calls(fn, n: int, device: torch.device) -> list[float]:
    """Seconds taken by each of n calls of fn()."""
    out = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out
