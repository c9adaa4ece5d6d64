from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import kiln, run_fixture_script
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
    ref = np.arange(8, dtype=np.float32).reshape(2, 4)  # varies between samples: not a degenerate reference
    cand = ref.copy()
    cand[1, 3] += 1e-3
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


# --- parity against the part of the output that varies between inputs -----------------------------------------

def _resnet_like(samples: int = 16, classes: int = 10) -> np.ndarray:
    """Like the random-weight ResNet-50: a large shared output, the part that varies between inputs 3 % of it."""
    rng = np.random.default_rng(0)
    return (rng.normal(size=classes) + 0.03 * rng.normal(size=(samples, classes))).astype(np.float32)


def test_centered_measures_on_constructed_outputs():
    ref = np.array([[1.0, 0.0], [3.0, 0.0]])  # mean [2, 0]; varying part [[-1, 0], [1, 0]]
    got = parity.compare(ref, ref + [[0.1, 0.0], [0.1, 0.0]])
    assert got["variation"] == pytest.approx(np.sqrt(2) / np.sqrt(10))
    assert got["error_to_signal"] == pytest.approx(np.sqrt(0.02) / np.sqrt(2))
    # the shift moves both samples alike: the varying part keeps its direction up to that offset
    assert got["centered_cosine"] == pytest.approx((0.9 + 1.1) / (np.sqrt(0.81 + 1.21) * np.sqrt(2)))
    flipped = parity.compare(ref, ref[::-1].copy())
    assert flipped["centered_cosine"] == pytest.approx(-1.0) and flipped["error_to_signal"] == pytest.approx(2.0)


@pytest.mark.parametrize("reference", [
    np.ones((4, 3), np.float32),  # constant: variation 0, nothing to divide by
    np.zeros((4, 3), np.float32),
    np.arange(3, dtype=np.float32)[None],  # one sample cannot vary
    np.arange(4, dtype=np.int64),  # labels are right or wrong, not centered
])
def test_centered_measures_are_none_where_they_cannot_be_measured(reference):
    got = parity.compare(reference, reference)
    assert got["centered_cosine"] is None and got["error_to_signal"] is None
    assert got["variation"] == (0.0 if reference.ndim == 2 and len(reference) > 1 else None)


def test_the_mean_output_for_every_input_passes_cosine_and_fails_the_centered_gate():
    ref = _resnet_like()
    mean = np.broadcast_to(ref.mean(axis=0), ref.shape).copy()
    measured = parity.compare(ref, mean)
    assert measured["cosine"] > 0.999 and measured["variation"] < 0.05
    assert measured["error_to_signal"] == pytest.approx(1.0) and measured["centered_cosine"] == 0.0
    found = _judge({"parity": {"default": {"min_cosine": 0.999}}}, ref, mean)
    assert all(v["passed"] for v in found if v["subject"] == "logits")
    failed = [v for v in _judge({}, ref, mean) if not v["passed"]]
    assert [v["gate"] for v in failed if v["gate"] == "max_error_to_signal"] == ["max_error_to_signal"]
    fp32 = ref + np.float32(1e-6) * np.random.default_rng(1).normal(size=ref.shape).astype(np.float32)
    assert all(v["passed"] for v in _judge({}, ref, fp32) if v["subject"] == "logits")


def _nan_reference() -> np.ndarray:
    ref = _resnet_like()
    ref[3, 2] = np.nan
    return ref


@pytest.mark.parametrize("reference, why", [
    (np.full((16, 10), 0.001, np.float32), "does not vary across the 16 validation samples (variation 0)"),
    (np.zeros((16, 10), np.float32), "is all zero on the 16 validation samples"),
    (_nan_reference(), "contains 1 NaN and 0 Inf values"),
])
def test_a_degenerate_reference_fails_with_one_line_unless_allowed(reference, why):
    candidate = np.nan_to_num(reference)
    failed = [v for v in _judge({}, reference, candidate) if not v["passed"]]
    assert failed[0]["gate"] == "degenerate"
    message = failed[0]["message"]
    assert message.startswith(f"output 'logits': the original model's output {why}; parity on it proves nothing")
    assert "\n" not in message and "gates.parity.allow_degenerate: true" in message
    allowed = _judge({"parity": {"allow_degenerate": True}}, reference, candidate)
    assert next(v for v in allowed if v["gate"] == "degenerate")["passed"]


def test_labels_and_a_single_sample_are_not_judged_degenerate():
    # A classifier may give one label to every synthetic sample; its scores (varying) are judged instead.
    labels = np.zeros(16, np.int64)
    assert parity.degenerate(parity.compare(labels, labels)) is None
    one = _resnet_like(samples=1)
    assert parity.degenerate(parity.compare(one, one)) is None
    assert parity.degenerate(parity.compare(_resnet_like(), _resnet_like())) is None


def test_judge_parity_and_metrics_from_before_variation_was_measured():
    constant = np.full((16, 10), 0.001, np.float32)
    gates = Gates().parity.model_dump(mode="json")
    found, _ = gate.judge_parity({"logits": constant}, {"logits": constant}, None, gates)
    assert not found[0]["passed"] and "does not vary" in found[0]["message"]
    # validate metrics cached before this measure existed: neither degenerate nor centered gate, no crash
    ref = _resnet_like()
    metrics = _metrics(ref, ref)
    for key in (*parity.CENTERED, "reference_norm", "reference_inf"):
        metrics["outputs"]["logits"].pop(key, None)
    config = Gates().model_dump(mode="json")
    judged = gate.verdicts(config, metrics, {"logits": ref}, {"logits": ref})
    assert {v["gate"] for v in judged if v["subject"] == "logits"} == {"finite", "atol_rtol", "min_cosine"}


@pytest.mark.slow
def test_kiln_run_refuses_a_model_whose_output_does_not_vary(tmp_path):
    """Through the real CLI: a constant-output model (MLflow 3 defaults) is a gate failure, exit 1, one line
    naming the output; nothing is published."""
    registry = run_fixture_script("register_constant.py", f"sqlite:///{tmp_path / 'mlflow.db'}")
    recipe = tmp_path / "constant.yaml"
    recipe.write_text("name: constant\nsource: {uri: 'models:/constant@champion'}\n"
                      "validation: {latency: {batch_sizes: [1], time_budget_s: 1}}\n")
    result = kiln("run", str(recipe), "--tracking-uri", registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("kiln:")]
    assert "output 'output_0': the original model's output does not vary across the 32 validation samples" in line
    assert "allow_degenerate" in line, line
    assert not (tmp_path / "a" / "bundles" / "constant").exists()
