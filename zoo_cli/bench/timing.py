"""Timing shared by the benchmarks: medians after a warm-up, and the machine's fp32 matmul limit.

Every figure of a table comes from the same process, the same inputs and the same minutes, so the
ratios hold on a busy machine even when the absolute numbers move. Throughput is the median of
per-batch (per-search) times after a warm-up, which shrugs off a neighbour's burst better than a
mean. The machine limit divides the best measured fp32 matmul FLOP/s (torch.mm, 2048^3, the
fastest of several runs) by the model's FLOPs per image (torch's FLOP counter, 2 per MAC).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def say(msg: str = "") -> None:
    """Print at once: a benchmark's lines must show while it runs, not when it ends."""
    print(msg, flush=True)


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1, min_seconds: float = 1.0) -> float:
    """Median seconds of `fn` over at least `repeats` calls and at least `min_seconds` of calls.

    The time floor matters for small models: 4 batches of a 28-px net last ~40 ms, where one
    scheduler hiccup moved a ratio by 2x between runs.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < max(1, repeats) or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of torch on this machine (all intra-op threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


def model_flops(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one image's forward pass (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())
