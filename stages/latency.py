"""Latency measurement that compares runtimes fairly on a noisy machine: warm-up, then interleaved rounds so
that drift (thermal, other processes) hits every runtime alike; per-call times in ms."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def stats(samples_ms: list[float], batch: int) -> dict[str, float]:
    values = np.asarray(samples_ms)
    p50 = float(np.percentile(values, 50))
    return {
        "p50_ms": p50,
        "p95_ms": float(np.percentile(values, 95)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "throughput_per_s": float(batch * 1000.0 / values.mean()),
        "iterations": int(values.size),
    }


def measure(calls: dict[str, Callable[[], object]], batch: int, warmup: int, iterations: int, rounds: int = 5) -> dict:
    """{name: stats} for each zero-argument call, `iterations` timed runs each, split into interleaved rounds."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_round = [iterations // rounds + (1 if r < iterations % rounds else 0) for r in range(rounds)]
    for count in per_round:
        for name, call in calls.items():
            for _ in range(count):
                start = time.perf_counter_ns()
                call()
                times[name].append((time.perf_counter_ns() - start) / 1e6)
    return {name: stats(samples, batch) for name, samples in times.items()}
