"""Hardware-targeted tuning: targets as data, candidates measured under the parity gates, the winner published
with the exact session settings it won with, missing providers skipped with a reason, re-runs measure nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import RECIPES, derive_recipe, kiln, run_json, steps_by_status
from pipeline.hashing import sha256_file
from stages import machine, onnx_runtime, tune

HAS_CUDA = machine.unavailable_reason("CUDAExecutionProvider", machine.describe()) is None


def _recipe(tmp: Path, name: str, tune_section: dict, select: str = "tuned", **more) -> Path:
    return derive_recipe(tmp / f"{name}.yaml", RECIPES / "digits-cnn.yaml", {
        "name": name, "serving": {"targets": ["triton"]}, "tune": tune_section, "select": select,
        "validation": {"latency": {"batch_sizes": [1, 32], "iterations": 100, "target_ci": None}}, **more,
    })


# --- fast ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tune_section, select, expected", [
    ({"targets": ["tpu"]}, "tuned", "tune.targets: 'tpu' is neither built in"),
    ({"targets": ["cpu"], "publish": "cuda"}, "tuned", "tune.publish: 'cuda' is not one of tune.targets"),
    (None, "tuned", "select: tuned needs a `tune` section"),
    ({"targets": ["cpu"], "profiles": {"cpu": {"provider": "CPUExecutionProvider", "io_bindings": [True]}}}, "tuned",
     "tune.profiles.cpu.io_bindings: unknown key"),
])
def test_bad_tune_sections_name_the_field(tmp_path, tune_section, select, expected):
    recipe = _recipe(tmp_path, "digits-bad-tune", tune_section, select)
    result = kiln("validate", str(recipe))
    assert result.returncode == 2 and expected in result.stderr, result.stderr


def test_targets_lists_what_this_machine_can_tune_for():
    import onnxruntime as ort

    result = kiln("targets", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    rows = {row["target"]: row for row in listed["targets"]}
    assert {"cpu", "cuda", "tensorrt", "openvino"} <= set(rows) and rows["cpu"]["available"]
    for row in rows.values():  # available exactly when the provider is in this onnxruntime build (and a GPU is)
        assert row["available"] == (row["provider"] in ort.get_available_providers()
                                    and (row["provider"] not in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                                         or bool(listed["machine"]["gpus"])))
        assert row["available"] or row["provider"] in row["reason"]
    with open("/proc/cpuinfo") as handle:
        has_avx2 = " avx2" in handle.read()
    assert listed["machine"]["cores"] >= 1 and ("AVX2" in listed["machine"]["isa"]) == has_avx2


def test_pareto_front_keeps_exactly_the_undominated_candidates():
    rows = [
        {"candidate": "fast-lossy", "objective": 1.0, "error": {"mean_cosine": 0.99}, "bytes": 10},
        {"candidate": "slow-exact", "objective": 3.0, "error": {"mean_cosine": 1.0}, "bytes": 40},
        {"candidate": "dominated", "objective": 3.5, "error": {"mean_cosine": 0.99}, "bytes": 40},
        {"candidate": "small", "objective": 4.0, "error": {"mean_cosine": 0.98}, "bytes": 5},
    ]
    assert tune.pareto(rows) == ["fast-lossy", "slow-exact", "small"]


def test_objective_is_the_geometric_mean_over_batch_sizes():
    per_batch = {"1": {"p95_ms": 2.0, "p50_ms": 1.0, "throughput_per_s": 1000.0},
                 "32": {"p95_ms": 8.0, "p50_ms": 4.0, "throughput_per_s": 8000.0}}
    assert tune.objective(per_batch, "p95") == pytest.approx(4.0)
    assert tune.objective(per_batch, "p50") == pytest.approx(2.0)
    assert tune.objective(per_batch, "throughput") == pytest.approx((1.0 * 0.125) ** 0.5)


def test_io_bound_runner_gives_the_same_outputs_as_a_plain_session(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    feeds = {"x": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
    bound = onnx_runtime.Runner(tmp_path / "m.onnx", onnx_runtime.settings(
        "CPUExecutionProvider", {}, 1, "parallel", "all", True, True))
    call = bound.call(feeds)
    call()
    np.testing.assert_array_equal(bound.run(feeds)[0], np.maximum(feeds["x"], 0))
    baked = onnx_runtime.bake(tmp_path / "m.onnx", bound.config, tmp_path / "baked.onnx")
    assert baked["session_options"]["graph_optimization_level"] == "ORT_DISABLE_ALL"
    np.testing.assert_array_equal(onnx_runtime.Runner(tmp_path / "baked.onnx", baked).run(feeds)[0],
                                  np.maximum(feeds["x"], 0))


# --- slow: the real CLI on the trained digits model ----------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tuning-artifacts")


TUNE = {"targets": ["cpu", "cuda"], "space": {"exporters": ["dynamo", "torchscript"]},
        "gates": {"default": {"min_cosine": 0.999}, "max_accuracy_drop": 0.01},
        "budget": {"max_trials": 24, "time_budget_s": 120}}


@pytest.mark.slow
def test_tuned_winner_is_published_with_its_settings_and_a_missing_gpu_is_skipped(registry, artifacts, tmp_path):
    recipe = _recipe(tmp_path, "digits-tuned", TUNE)
    result, summary = run_json(str(recipe), "--tracking-uri", registry, "--artifacts", str(artifacts))
    assert result.returncode == 0, result.stderr
    bundle = Path(summary["recipes"][0]["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    cpu = manifest["tuning"]["cpu"]

    # every candidate exporter x precision was built and judged; fp16 is not a cpu-profile precision
    candidates = {c["candidate"]: c for c in cpu["candidates"]}
    assert {c["exporter"] for c in candidates.values()} == {"dynamo", "torchscript"}
    assert {c["precision"] for c in candidates.values()} == {"fp32", "int8-dynamic", "int8-static"}
    # the winner passed its parity gates and had the lowest objective in the final, interleaved comparison
    winner = next(c for c in candidates.values() if c["winner"])
    assert winner["passed"]
    timed = [c for c in candidates.values() if c["objective"] is not None]
    front = [c for c in timed if c["pareto"]]
    for c in timed:  # off the front means some front member is at least as good on latency, error and size
        if not c["pareto"]:
            assert any(f["objective"] <= c["objective"] and f["bytes"] <= c["bytes"]
                       and 1 - f["error"]["mean_cosine"] <= 1 - c["error"]["mean_cosine"] for f in front), c
    finalists = [t for t in cpu["trials"] if "final_objective" in t]
    assert 1 <= len(finalists) <= 6  # three finalists, and up to three challengers whose trial beat the winner
    assert min(finalists, key=lambda t: t["final_objective"])["candidate"] == winner["candidate"]
    # the published objective is the lowest in the table, or the row that beats it says why
    assert winner["objective"] == cpu["winner"]["objective"] and winner["measured"] == "final"
    assert all(c["objective"] >= winner["objective"] or c.get("note") for c in timed if c["passed"])
    # every timing the tuner decided on was stopped by the same rule: at least the harness's fewest runs
    assert all(b["iterations"] >= 5 for t in cpu["trials"] if t["latency"] for b in t["latency"].values())
    assert all(not c["winner"] for c in candidates.values() if not c["passed"])
    assert cpu["machine"]["cores"] >= 1 and "CPUExecutionProvider" in cpu["machine"]["providers"]

    # select: tuned publishes the cpu winner with exactly its settings, and the servers get the same settings
    assert sha256_file(bundle / "model.onnx") == sha256_file(bundle / "targets" / "cpu" / "model.onnx")
    published = json.loads((bundle / "session_config.json").read_text())
    tuned = json.loads((bundle / "targets" / "cpu" / "session_config.json").read_text())
    assert published == tuned
    assert {k: published[k] for k in ("providers", "provider_options", "session_options", "io_binding")} == \
        {k: cpu["winner"]["settings"][k] for k in ("providers", "provider_options", "session_options", "io_binding")}
    assert manifest["metrics"]["session"] == cpu["winner"]["settings"]  # validated with them
    runner = onnx_runtime.Runner(bundle / "model.onnx", published)
    with np.load(bundle / "sample_inputs.npz") as inputs, np.load(bundle / "sample_outputs.npz") as expected:
        got = runner.run({name: inputs[name] for name in inputs.files})
        np.testing.assert_allclose(got[0], expected["logits"], rtol=1e-5, atol=1e-6)
    config = (bundle / "serving" / "triton" / "digits-tuned" / "config.pbtxt").read_text()
    threads = published["session_options"]["intra_op_num_threads"]
    assert f'key: "intra_op_thread_count" value: {{ string_value: "{threads}" }}' in config

    report = (bundle / "report.md").read_text()
    if HAS_CUDA:
        assert not manifest["tuning"]["cuda"].get("skipped")
    else:  # the cuda target is skipped with its reason, and the run still passes
        assert "CUDAExecutionProvider" in manifest["tuning"]["cuda"]["skipped"]
        assert "## Tuning for `cuda`" in report and "skipped: CUDAExecutionProvider" in report
        assert not (bundle / "targets" / "cuda").exists()
    assert "## Tuning for `cpu`" in report and "**winner**" in report
    # the load the trials ran under is on record: a busy machine's winner may not be a quiet machine's
    load = cpu["load_average"]
    assert load["busy"] == (max(load["before"], load["after"]) > 1.5 * cpu["machine"]["cores"])
    assert f"load average while timing: {load['before']} → {load['after']}" in report

    # re-running the tuned recipe measures nothing
    result, again = run_json(str(recipe), "--tracking-uri", registry, "--artifacts", str(artifacts))
    assert result.returncode == 0, result.stderr
    assert steps_by_status(again, "ran") == []


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="this machine can tune for cuda")
def test_publishing_a_target_this_machine_lacks_is_one_clear_error(registry, artifacts, tmp_path):
    recipe = _recipe(tmp_path, "digits-cuda-only", {**TUNE, "targets": ["cuda"]})
    result = kiln("run", str(recipe), "--tracking-uri", registry, "--artifacts", str(artifacts))
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("kiln:")]
    assert "tune.publish: target 'cuda' cannot be tuned on this machine" in line
    assert not (artifacts / "bundles" / "digits-cuda-only").exists()
