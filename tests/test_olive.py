"""Olive interop: a precision variant built by Olive passes (olive-ai, offline, local model) runs through the real
CLI as one cached step, is validated against the original PyTorch model like any variant, and bad pass names or
parameters are one-line errors that name the recipe field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import RECIPES, derive_recipe, kiln, run_json, steps_by_status
from pipeline.hashing import sha256_file
from pipeline.store import Store

STATIC = {"name": "olive-int8", "kind": "olive",
          "passes": [{"type": "OnnxStaticQuantization",
                      "config": {"precision": "int8", "activation_type": "uint8", "per_channel": True}}],
          "calibration": {"samples": 64, "seed": 0},
          # Olive's full-integer QDQ (prepare_qdq_config) quantizes more ops than kiln's int8-static
          "gates": {"default": {"min_cosine": 0.995}, "max_accuracy_drop": 0.005}}
DYNAMIC = {"name": "olive-dyn", "kind": "olive", "passes": [{"type": "OnnxDynamicQuantization"}],
           "gates": {"default": {"min_cosine": 0.99}}}


def _recipe(tmp: Path, name: str, variants: list[dict], select: str) -> Path:
    return derive_recipe(tmp / f"{name}.yaml", RECIPES / "digits-cnn.yaml", {
        "name": name, "serving": {"targets": []}, "variants": variants, "select": select,
        "validation": {"latency": {"batch_sizes": [1], "iterations": 100, "target_ci": None}},
    })


def _kiln_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("kiln:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.slow
def test_olive_variant_is_one_cached_step_and_passes_validation(registry, tmp_path):
    artifacts = tmp_path / "artifacts"
    recipe = _recipe(tmp_path, "digits-olive", [STATIC, DYNAMIC], select="olive-int8")
    result, summary = run_json(str(recipe), "--tracking-uri", registry, "--artifacts", str(artifacts))
    assert result.returncode == 0, result.stderr
    steps = {s["step"].split(":", 1)[1]: s for s in summary["recipes"][0]["steps"]}
    assert {"olive.olive-int8", "validate.olive-int8", "gate.olive-int8", "olive.olive-dyn"} <= set(steps)
    assert not any(name.startswith("quantize.") for name in steps)

    # The published model is Olive's output, validated against the original PyTorch model and gated.
    bundle = Path(summary["recipes"][0]["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = {v["name"]: v for v in manifest["variants"]}
    assert rows["olive-int8"]["selected"] and rows["olive-int8"]["kind"] == "olive" and rows["olive-int8"]["passed"]
    assert rows["olive-int8"]["cosine"] >= 0.995 and manifest["metrics"]["task"]["drop"] <= 0.005
    assert manifest["gates"]["passed"]
    built = Store(artifacts / "store").lookup(steps["olive.olive-int8"]["key"]).out
    assert sha256_file(bundle / "model.onnx") == sha256_file(built / "model.onnx")
    assert rows["olive-int8"]["bytes"] < rows["fp32"]["bytes"] / 2

    # The record: Olive's version, each pass as given and as Olive resolved it, what it did to the graph.
    record = json.loads((built / "olive.json").read_text())
    assert record["olive_version"] == "0.13.0"
    (static,) = record["passes"]
    assert static["type"] == "OnnxStaticQuantization" and static["config"]["data_config"] == "kiln_calibration"
    assert static["resolved_config"]["per_channel"] is True and static["resolved_config"]["quant_format"] == "QDQ"
    assert static["ops_added"].get("QuantizeLinear", 0) > 0
    assert len(record["calibration"]["sha256"]) == 64

    again, summary = run_json(str(recipe), "--tracking-uri", registry, "--artifacts", str(artifacts))
    assert again.returncode == 0, again.stderr
    assert steps_by_status(summary, "ran") == []


@pytest.mark.slow
def test_unknown_pass_name_names_the_field_and_publishes_nothing(registry, tmp_path):
    bad = {**DYNAMIC, "passes": [{"type": "OnnxDynamicQuantizaton"}]}
    recipe = _recipe(tmp_path, "digits-olive-typo", [bad], select="olive-dyn")
    result = kiln("run", str(recipe), "--tracking-uri", registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2
    line = _kiln_error(result.stderr)
    assert "variants.olive-dyn.passes[0].type" in line and "did you mean OnnxDynamicQuantization" in line
    assert not (tmp_path / "a" / "bundles").exists()
    assert kiln("validate", str(recipe)).returncode == 2


@pytest.mark.slow
def test_unknown_pass_parameter_names_the_field_and_publishes_nothing(registry, tmp_path):
    # Olive 0.13 has `precision`, not `weight_type`; Olive itself would only warn and quantize with defaults.
    bad = {**DYNAMIC, "passes": [{"type": "OnnxDynamicQuantization", "config": {"weight_type": "QInt8"}}]}
    recipe = _recipe(tmp_path, "digits-olive-param", [bad], select="olive-dyn")
    result = kiln("run", str(recipe), "--tracking-uri", registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2
    assert "variants.olive-dyn.passes[0].config.weight_type: not a parameter" in _kiln_error(result.stderr)
    assert not (tmp_path / "a" / "bundles").exists()


def test_schema_wants_passes_exactly_for_kind_olive(tmp_path):
    for variant, problem in (({"name": "o", "kind": "olive"}, "kind olive needs a non-empty list"),
                             ({"name": "o", "kind": "olive", "passes": []}, "kind olive needs a non-empty list"),
                             ({**DYNAMIC, "kind": "int8-dynamic"},
                              "only kind olive takes 'passes' (this variant is int8-dynamic)")):
        recipe = derive_recipe(tmp_path / "r.yaml", RECIPES / "digits-cnn.yaml", {"variants": [variant]})
        result = kiln("validate", str(recipe))
        assert result.returncode == 2 and "variants.0.passes: " + problem in result.stderr, result.stderr
