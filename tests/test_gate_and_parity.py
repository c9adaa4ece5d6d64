from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.recipe import Gates
from stages import gate, latency, parity


def _metrics(reference, candidate, labels=None, p95=2.0, speedup=1.5):
    outputs = {"logits": parity.compare(reference, candidate)}
    task = None
    if labels is not None:
        task = {"metric": "top1_accuracy", "output": "logits", "samples": len(labels),
                "reference": parity.accuracy(reference, labels), "candidate": parity.accuracy(candidate, labels)}
        task["drop"] = task["reference"] - task["candidate"]
    def timing():
        return {"original": {"p95_ms": 3.0}, "onnxruntime": {"p95_ms": p95}, "speedup_p50": speedup}

    return {"outputs": outputs, "task": task, "latency": {"1": timing(), "8": timing()}}


def _judge(gates: dict, reference, candidate, **kwargs):
    config = Gates.model_validate(gates).model_dump(mode="json")
    return gate.verdicts(config, _metrics(reference, candidate, **kwargs), {"logits": reference}, {"logits": candidate})


def test_compare_measures():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    cand = ref + np.array([[0.0, 0.0, 0.1], [0.0, 0.0, 0.0]], np.float32)
    got = parity.compare(ref, cand)
    assert got["max_abs_error"] == pytest.approx(0.1, rel=1e-5)
    assert got["max_rel_error"] == pytest.approx(0.1 / 3, rel=1e-4)
    assert got["top1_agreement"] == 1.0
    assert 0.999 < got["cosine"] < 1.0
    flipped = parity.compare(ref, ref[:, ::-1].copy())
    assert flipped["top1_agreement"] == 0.0


def test_an_all_zero_output_row_is_not_a_match():
    # A softmax quantized to zeros must not read as a perfect per-sample cosine; two zero rows do match.
    reference = np.array([[0.001, 0.002, 0.997], [0.0, 0.0, 0.0]])
    assert parity.mean_row_cosine(reference, np.zeros_like(reference)) == 0.5
    assert parity.mean_row_cosine(reference, reference) == pytest.approx(1.0)
    assert parity.compare(reference[:1], np.zeros((1, 3)))["mean_row_cosine"] == 0.0


def test_nan_is_counted_and_fails():
    ref = np.ones((2, 3), np.float32)
    cand = ref.copy()
    cand[1, 2] = np.nan
    found = _judge({}, ref, cand)
    finite = next(v for v in found if v["gate"] == "finite")
    assert not finite["passed"] and "1 NaN" in finite["message"]


def test_atol_zero_names_output_and_index():
    ref = np.zeros((2, 4), np.float32)
    cand = ref.copy()
    cand[1, 3] = 1e-6
    found = _judge({"parity": {"default": {"atol": 0, "rtol": 0}}}, ref, cand)
    failed = [v for v in found if not v["passed"]]
    assert len(failed) == 1
    assert "output 'logits'" in failed[0]["message"] and "(1, 3)" in failed[0]["message"]
    assert "1 of 8 elements" in failed[0]["message"]


def test_per_output_override_merges_with_default():
    ref = np.zeros((2, 4), np.float32)
    cand = ref + 1e-3
    assert any(not v["passed"] for v in _judge({}, ref, cand))  # default atol 1e-4 fails
    found = _judge({"parity": {"outputs": {"logits": {"atol": 1e-2}}}}, ref, cand)
    assert all(v["passed"] for v in found if v["gate"] == "atol_rtol")


def test_unknown_output_in_gates_fails_loudly():
    ref = np.zeros((2, 4), np.float32)
    found = _judge({"parity": {"outputs": {"logit": {"atol": 1}}}}, ref, ref)
    assert any(not v["passed"] and "no output 'logit'" in v["message"] for v in found)


def test_accuracy_drop_gate():
    ref = np.eye(4, dtype=np.float32)
    cand = ref.copy()
    cand[0] = [0, 1, 0, 0]
    labels = np.arange(4)
    found = _judge({"parity": {"default": {}, "max_accuracy_drop": 0.1}}, ref, cand, labels=labels)
    drop = next(v for v in found if v["gate"] == "max_accuracy_drop")
    assert not drop["passed"] and drop["value"] == pytest.approx(0.25)


def test_latency_gates_per_batch():
    ref = np.zeros((2, 4), np.float32)
    found = _judge({"latency": {"max_p95_ms": {1: 1.0, 8: 5.0}, "min_speedup": 2.0}}, ref, ref, p95=2.0, speedup=1.5)
    by = {(v["gate"], v["subject"]): v["passed"] for v in found}
    assert by[("max_p95_ms", "batch 1")] is False and by[("max_p95_ms", "batch 8")] is True
    assert by[("min_speedup", "batch 1")] is False


def test_timing_holds_the_machine_wide_measuring_lock(tmp_path):
    """While one step times, another process's attempt to take the lock fails: timing is queued, not mixed."""
    import subprocess
    import sys

    probe = ("import fcntl, sys; h = open(sys.argv[1], 'a')\n"
             "try:\n    fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except BlockingIOError:\n    print('held')")
    lock = str(tmp_path / "kiln-latency.lock")
    with latency.exclusive(Path(lock)):
        inside = subprocess.run([sys.executable, "-c", probe, lock], capture_output=True, text=True).stdout.strip()
    after = subprocess.run([sys.executable, "-c", probe, lock], capture_output=True, text=True).stdout.strip()
    assert (inside, after) == ("held", "free")


def test_latency_regression_against_the_previous_version():
    ref = np.zeros((2, 4), np.float32)
    config = Gates.model_validate({"latency": {"max_regression": 0.2}}).model_dump(mode="json")
    metrics = _metrics(ref, ref)
    metrics["latency"]["1"]["onnxruntime"]["p50_ms"] = 1.5
    metrics["latency"]["8"]["onnxruntime"]["p50_ms"] = 1.1
    baseline = {"source": {"version": "3"},
                "metrics": {"latency": {"1": {"onnxruntime": {"p50_ms": 1.0}}, "8": {"onnxruntime": {"p50_ms": 1.0}}}}}
    found = gate.verdicts(config, metrics, {"logits": ref}, {"logits": ref}, None, baseline)
    by = {v["subject"]: v for v in found if v["gate"] == "max_regression"}
    assert by["batch 1"]["passed"] is False and "1.50x version 3's" in by["batch 1"]["message"]
    assert by["batch 8"]["passed"] is True
    assert not [v for v in gate.verdicts(config, metrics, {"logits": ref}, {"logits": ref}) if v["gate"] == "max_regression"]
