"""Latency measurement that compares runtimes fairly on a noisy machine: warm-up, then interleaved rounds so
that drift (thermal, other processes) hits every runtime alike. Rounds continue past the minimum until every
runtime's p50 is known to the target precision (its 95 % confidence interval), or the time budget or the
iteration cap is reached. Process RSS is sampled every millisecond during each runtime's warm-up and after each
of its timed rounds, for its peak (both runtimes share the process, so it is the process's peak by then)."""

from __future__ import annotations

import contextlib
import fcntl
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * (4096 / 2**20)
    except (OSError, ValueError, IndexError):
        return float("nan")


class _PeakRss:
    """Samples this process's resident memory every millisecond while active."""

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


LOCK = Path(tempfile.gettempdir()) / "kiln-latency.lock"


@contextlib.contextmanager
def exclusive(lock: Path = LOCK):
    """This machine's measuring lock, held while timing: two steps (or two kiln runs) timing at once on shared
    cores would each measure the other. Parallel steps still build in parallel; only their timing queues."""
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def median_ci(values: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Distribution-free 95 % confidence interval of the median (order statistics of a binomial)."""
    ordered = np.sort(values)
    n = ordered.size
    half = z * math.sqrt(n) / 2
    low = max(0, int(math.floor(n / 2 - half)) - 1)
    high = min(n - 1, int(math.ceil(n / 2 + half)))
    return float(ordered[low]), float(ordered[high])


def stats(samples_ms: list[float], batch: int) -> dict:
    values = np.asarray(samples_ms)
    low, high = median_ci(values)
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p50_ci_ms": (high - low) / 2,
        "p95_ms": float(np.percentile(values, 95)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "throughput_per_s": float(batch * 1000.0 / values.mean()),
        "iterations": int(values.size),
        "samples_ms": [round(v, 5) for v in samples_ms],
    }


def _precise(samples: list[float], target: float) -> bool:
    values = np.asarray(samples)
    low, high = median_ci(values)
    return (high - low) / 2 <= target * float(np.median(values))


def measure(
    calls: dict[str, Callable[[], object]],
    batch: int,
    warmup: int,
    iterations: int,
    rounds: int = 5,
    target_ci: float | None = None,
    max_iterations: int | None = None,
    time_budget_s: float | None = None,
) -> dict:
    """{name: stats} for each zero-argument call: at least `iterations` timed runs each in `rounds` interleaved
    rounds; with target_ci, more rounds until each p50's 95 % CI half-width <= target_ci x p50."""
    peaks: dict[str, float] = {}
    for name, call in calls.items():
        with _PeakRss() as rss:
            for _ in range(warmup):
                call()
        peaks[name] = rss.peak
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_round = max(1, iterations // rounds)
    started = time.perf_counter()
    cap = max_iterations or iterations
    while True:
        for name, call in calls.items():
            # No sampler thread while timing: it would compete for the GIL with the runtime being timed.
            for _ in range(per_round):
                begin = time.perf_counter_ns()
                call()
                times[name].append((time.perf_counter_ns() - begin) / 1e6)
            peaks[name] = max(peaks[name], _rss_mb())
        done = min(len(t) for t in times.values())
        if done < iterations:
            continue
        if target_ci is None or all(_precise(t, target_ci) for t in times.values()):
            break
        if done >= cap or (time_budget_s is not None and time.perf_counter() - started > time_budget_s):
            break
    result = {name: stats(samples, batch) for name, samples in times.items()}
    for name in result:
        result[name]["peak_rss_mb"] = round(peaks[name], 1)
        result[name]["ci_target_met"] = target_ci is None or _precise(times[name], target_ci)
    return result
