"""Timing variants interleaved on a shared machine: per-round seconds, medians, paired
ratios, spreads."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Run each variant once per round; return per-round seconds (after warm-up).

    The order rotates by one every round, so no variant always follows the same one:
    whoever runs first after a cache-thrashing neighbour (the per-parameter EMA loop
    allocates a new copy of every weight) would otherwise always pay for it.
    """
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[name]
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num_i / den_i: both ran seconds apart, under the same load."""
    return statistics.median(n / d for n, d in zip(num, den))


def spread(xs: list[float]) -> float:
    """Interquartile range over the median: how noisy a figure is."""
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)
