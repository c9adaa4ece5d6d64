"""The latency harness (stages/latency.py) on synthetic runtimes and a virtual clock, so every figure is exact:
what a runtime costs is what the test says, not what this machine happens to do."""

from __future__ import annotations

import random
import types

import numpy as np
import pytest

from stages import latency


class Clock:
    """A virtual perf_counter that only calls move."""

    def __init__(self) -> None:
        self.now_ns = 0

    def module(self):
        return types.SimpleNamespace(perf_counter_ns=lambda: self.now_ns, perf_counter=lambda: self.now_ns / 1e9)

    def spend(self, ms: float) -> None:
        self.now_ns += int(round(ms * 1e6))


@pytest.fixture
def clock(monkeypatch):
    found = Clock()
    monkeypatch.setattr(latency, "time", found.module())
    return found


def switching(clock: Clock, names: list[str], ms: float = 1.0, cold_ms: float = 20.0) -> dict:
    """Runtimes whose first call after another runtime ran costs cold_ms more (the slowdown measured with
    interleaved ONNX Runtime sessions: the other's threads still spin, its weights fill the caches)."""
    state = {"last": None, "cold": 0}

    def runtime(name):
        def call():
            cold = state["last"] not in (None, name)
            state["cold"] += cold
            clock.spend(ms + (cold_ms if cold else 0.0))
            state["last"] = name
        return call

    return {name: runtime(name) for name in names}, state


def test_a_slow_first_call_after_each_switch_changes_nothing(clock):
    """The A/A test: three runtimes that cost 1 ms, +20 ms on the first call after any switch, report exactly
    what one of them timed alone reports: p50 = p95 = 1 ms. The slow calls happened (it is not a vacuous test)."""
    alone = latency.measure(switching(clock, ["a"])[0], batch=1)["a"]
    calls, state = switching(clock, ["a", "b", "c"])
    together = latency.measure(calls, batch=1)
    assert state["cold"] >= 3, "every runtime was switched to at least once"
    assert alone["p50_ms"] == pytest.approx(1.0) and alone["p95_ms"] == pytest.approx(1.0)
    for name, timing in together.items():
        assert timing["p50_ms"] == pytest.approx(alone["p50_ms"]), name
        assert timing["p95_ms"] == pytest.approx(alone["p95_ms"]), name
        assert max(timing["samples_ms"]) == pytest.approx(1.0), f"{name}: a cold call was timed"
        assert timing["rewarm_calls"] >= 1


def test_rounds_rotate_and_each_block_is_rewarmed(clock):
    """Every runtime leads a round in turn (drift hits them alike), and each block opens with untimed calls."""
    order = []
    calls, _ = switching(clock, ["a", "b", "c"], ms=60.0, cold_ms=0.0)
    logged = {n: (lambda n=n, c=c: (order.append(n), c())) for n, c in calls.items()}
    measured = latency.measure(logged, batch=1, warmup=1, min_iterations=12, min_seconds=100)
    blocks = [order[0]] + [b for a, b in zip(order, order[1:]) if a != b]
    assert blocks[:3] == ["a", "b", "c"]  # warm-ups
    assert blocks[3:12] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # three rounds, rotating
    for timing in measured.values():
        assert timing["iterations"] == 12  # blocks of 4: 250 ms of 60 ms calls
        assert timing["rewarm_calls"] == 3  # one call per block: 60 ms is more than the re-warm time


def test_precision_not_count_decides_when_to_stop(clock):
    """A steady call stops at the minimum; a noisy one needs more runs; both within the cap."""
    steady = latency.measure({"s": lambda: clock.spend(1.0)}, batch=1, min_iterations=10, target_ci=0.05)["s"]
    assert steady["ci_target_met"] and steady["iterations"] <= 200  # one block of a 1 ms call

    rng = random.Random(0)
    noisy = latency.measure({"n": lambda: clock.spend(1 + 4 * rng.random())}, batch=1, min_iterations=10,
                            target_ci=0.01, max_iterations=3000)["n"]
    assert noisy["iterations"] > steady["iterations"]
    assert noisy["iterations"] <= 3000


def test_a_slow_call_stops_after_a_few_seconds_of_runs(clock):
    """One second a call: 10 runs would cost 10 s per runtime and batch; min_seconds (2 s) and at least 5 runs
    are enough when the runs agree."""
    measured = latency.measure({"slow": lambda: clock.spend(1000.0)}, batch=32, min_iterations=10, min_seconds=2.0)
    assert latency.FEWEST <= measured["slow"]["iterations"] < 10 and measured["slow"]["ci_target_met"]


def test_p95_precision_takes_enough_runs_for_a_p95(clock):
    """With p95 (a gate or the tuner's objective reads it), measuring goes on until the p95 has a 95 % interval:
    a p95 from five runs is only their maximum."""
    rng = random.Random(1)
    measured = latency.measure({"c": lambda: clock.spend(100 + rng.random() * 5)}, batch=1, min_iterations=10,
                               min_seconds=0.5, p95=True)["c"]
    assert measured["iterations"] >= 60 and measured["p95_ci_ms"] is not None and measured["ci_target_met"]


def test_time_budget_and_fixed_count(clock):
    """The budget stops a measurement that cannot reach its precision; without target_ci, exactly the count."""
    rng = random.Random(2)
    wild = latency.measure({"w": lambda: clock.spend(rng.choice([1, 100]))}, batch=1, target_ci=0.001,
                           max_iterations=100_000, time_budget_s=5.0)["w"]
    assert not wild["ci_target_met"] and sum(wild["samples_ms"]) < 5_000 + 200 * 100
    fixed = latency.measure({"f": lambda: clock.spend(1.0)}, batch=1, min_iterations=37, target_ci=None,
                            max_iterations=37)["f"]
    assert fixed["iterations"] == 37
    # a fixed count of slow calls is not cut short by min_seconds
    slow = latency.measure({"s": lambda: clock.spend(500.0)}, batch=1, min_iterations=12, min_seconds=1.0,
                           target_ci=None, max_iterations=12, time_budget_s=None)["s"]
    assert slow["iterations"] == 12


def test_quantile_intervals():
    values = np.arange(1, 101, dtype=float)
    low, high = latency.median_ci(values)
    assert low < 50.5 < high and high - low < 25
    p95 = latency.quantile_ci(values, 0.95)
    assert p95 is not None and p95[0] < 95.5 <= p95[1]
    assert latency.quantile_ci(values[:20], 0.95) is None  # 20 runs give no interval for a p95
    assert latency.median_ci(values[:3]) == (1.0, 3.0)  # too few: the whole range
