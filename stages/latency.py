"""Latency measurement that compares runtimes fairly on a noisy machine, and stops when it knows enough.

Each runtime is timed in warm blocks of its own, the order rotating every round so that drift (thermal, other
processes) hits every runtime alike. A runtime's first calls after another one ran are slow (measured here: 31-61
ms against a 20 ms median for a MiniLM-sized ONNX Runtime session; the other runtime's threads still spin, its
weights fill the caches), so every block opens with untimed re-warm calls: no timed call follows a switch.
Measuring stops when every p50 (and p95 where it is gated or optimized) is known to the target precision (its
distribution-free 95 % confidence interval), after a small minimum, or when the time budget or the iteration cap
is reached. Process RSS is sampled every millisecond during each runtime's warm-up and after each of its blocks,
for its peak (the runtimes share the process, so it is the process's peak by then)."""

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


def quantile_ci(values: np.ndarray, q: float, z: float = 1.96) -> tuple[float, float] | None:
    """Distribution-free 95 % confidence interval of the q-quantile (order statistics of a binomial), or None
    when there are too few values for one (a p95 needs about 60)."""
    ordered = np.sort(values)
    n = ordered.size
    half = z * math.sqrt(n * q * (1 - q))
    low = int(math.floor(n * q - half)) - 1  # ranks counted from 1, indices from 0
    high = int(math.ceil(n * q + half)) - 1
    if low < 0 or high > n - 1:
        return None
    return float(ordered[low]), float(ordered[high])


def median_ci(values: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """The median's 95 % confidence interval; with few values, the widest the values allow."""
    found = quantile_ci(values, 0.5, z)
    if found is not None:
        return found
    ordered = np.sort(values)
    return float(ordered[0]), float(ordered[-1])


def stats(samples_ms: list[float], batch: int) -> dict:
    values = np.asarray(samples_ms)
    low, high = median_ci(values)
    p95_ci = quantile_ci(values, 0.95)
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p50_ci_ms": (high - low) / 2,
        "p95_ms": float(np.percentile(values, 95)),
        "p95_ci_ms": None if p95_ci is None else (p95_ci[1] - p95_ci[0]) / 2,
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "throughput_per_s": float(batch * 1000.0 / values.mean()),
        "iterations": int(values.size),
        "samples_ms": [round(v, 5) for v in samples_ms],
    }


# Fewer timed runs than this give no 95 % interval of the median at all (5 runs: the range covers it 94 % of
# the time), so precision is never judged on fewer.
FEWEST = 5


def precise(samples: list[float], target: float | None, p95: bool = False) -> bool:
    """Whether the p50 (and the p95 with `p95`) is known to within target x its value (95 % CI half-width)."""
    if target is None:
        return True
    values = np.asarray(samples)
    if values.size < FEWEST:
        return False
    low, high = median_ci(values)
    if (high - low) / 2 > target * float(np.median(values)):
        return False
    if p95:
        found = quantile_ci(values, 0.95)
        return found is not None and (found[1] - found[0]) / 2 <= target * float(np.percentile(values, 95))
    return True


class _Runtime:
    """One call being timed: its samples and how many timed calls make one block of it."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.call = call
        self.samples: list[float] = []
        self.timed_s = 0.0
        self.block = 1
        self.rewarm_calls = 0

    def time_one(self) -> None:
        begin = time.perf_counter_ns()
        self.call()
        elapsed = (time.perf_counter_ns() - begin) / 1e6
        self.samples.append(elapsed)
        self.timed_s += elapsed / 1000

    def untimed(self, seconds: float, at_least: int) -> list[float]:
        """Calls not timed for the result, for at least `seconds` and `at_least` calls; their durations."""
        took, started = [], time.perf_counter()
        while len(took) < at_least or time.perf_counter() - started < seconds:
            begin = time.perf_counter()
            self.call()
            took.append(time.perf_counter() - begin)
        return took


def _warm_up(runtime: _Runtime, warmup: int, seconds: float, block_seconds: float) -> float:
    """Untimed calls (at least `warmup`, for at least `seconds`), which also size the runtime's blocks; the peak
    RSS meanwhile."""
    with _PeakRss() as rss:
        took = runtime.untimed(seconds, warmup)
    cost = float(np.median(took[-3:]))
    runtime.block = int(min(200, max(3, round(block_seconds / max(cost, 1e-6)))))
    return rss.peak


def _done(runtimes: list[_Runtime], out_of_time: bool, min_iterations: int, min_seconds: float,
          target_ci: float | None, p95: bool, max_iterations: int) -> bool:
    """Whether to stop after this round: out of time (with 3 runs each), or every runtime past its minimum and
    either precise or at the cap."""
    if out_of_time and all(len(r.samples) >= 3 for r in runtimes):
        return True
    if target_ci is None:  # a fixed count, however long it takes
        return all(len(r.samples) >= min(min_iterations, max_iterations) for r in runtimes)
    for r in runtimes:
        n = len(r.samples)
        if not (n >= min(min_iterations, max_iterations) or (r.timed_s >= min_seconds and n >= FEWEST)):
            return False
    return all(len(r.samples) >= max_iterations for r in runtimes if not precise(r.samples, target_ci, p95))


def measure(
    calls: dict[str, Callable[[], object]],
    batch: int,
    warmup: int = 3,
    min_iterations: int = 10,
    min_seconds: float = 2.0,
    target_ci: float | None = 0.05,
    p95: bool = False,
    max_iterations: int = 2000,
    time_budget_s: float | None = 10.0,
    block_seconds: float = 0.25,
    rewarm_seconds: float = 0.05,
    say: Callable[[str], None] | None = None,
) -> dict:
    """{name: stats} for each zero-argument call, timed in warm blocks of its own.

    Each runtime is warmed up, then timed in rounds of blocks: one block per runtime per round, the order rotating
    every round so that drift hits every runtime alike. No timed call is the first after another runtime ran: each
    block opens with untimed calls for at least `rewarm_seconds` (the other runtime's threads may still spin, its
    weights fill the caches). A block lasts about `block_seconds` (at least 3 calls).

    Measuring stops by precision, not by count: once every runtime has `min_iterations` timed runs (or, for a slow
    call, `min_seconds` of them and at least 5), as soon as each one's p50 (and p95 with `p95`) is known to within
    `target_ci` of its value; or at `max_iterations` runs, or once `time_budget_s` is used (every runtime with at
    least 3 runs by then). `ci_target_met` says whether the precision was reached."""
    runtimes = {name: _Runtime(call) for name, call in calls.items()}
    peaks = {name: _warm_up(r, warmup, rewarm_seconds, block_seconds) for name, r in runtimes.items()}
    names = list(runtimes)
    last = names[-1]  # the last one warmed up: it alone may start without a re-warm
    started = time.perf_counter()
    round_index = 0
    while True:
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runtime = runtimes[name]
            room = max_iterations - len(runtime.samples)
            if room <= 0:  # at the cap: the others go on without it
                continue
            if name != last:
                runtime.rewarm_calls += len(runtime.untimed(rewarm_seconds, 1))
            # No sampler thread while timing: it would compete for the GIL with the runtime being timed.
            for _ in range(min(runtime.block, room)):
                runtime.time_one()
            peaks[name] = max(peaks[name], _rss_mb())
            last = name
            if say is not None:
                say(f"batch {batch}: {name} ({len(runtime.samples)} timed runs)")
        round_index += 1
        out_of_time = time_budget_s is not None and time.perf_counter() - started > time_budget_s
        if _done(list(runtimes.values()), out_of_time, min_iterations, min_seconds, target_ci, p95, max_iterations):
            break
    result = {}
    for name, runtime in runtimes.items():
        result[name] = stats(runtime.samples, batch)
        result[name].update(peak_rss_mb=round(peaks[name], 1), rewarm_calls=runtime.rewarm_calls,
                            ci_target_met=precise(runtime.samples, target_ci, p95))
    return result
