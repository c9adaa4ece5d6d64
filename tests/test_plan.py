"""plan_recipe on its own: the DAG the stages' declarations give for the example recipes (no registry needed)."""

from __future__ import annotations

from pathlib import Path

from conftest import RECIPES, derive_recipe
from pipeline.mlflow_registry import SourceRef
from pipeline.plan import plan_recipe
from pipeline.recipe import load_recipe
from pipeline.settings import Settings

SOURCE = SourceRef("models:/m@champion", "sqlite:///nowhere.db", "m", "3", "run1", "file:///m", 1)


def _plan(path: Path, tmp_path: Path):
    plan = plan_recipe(load_recipe(path), path, SOURCE, Settings(tmp_path / "artifacts"))
    return plan, {s.stage: s for s in plan.steps}


def _local(step) -> dict[str, str]:
    return {name: upstream.split(":", 1)[1] for name, upstream in step.inputs.items()}


def test_the_fp32_chain_and_its_serving_targets(tmp_path):
    plan, steps = _plan(RECIPES / "digits-cnn.yaml", tmp_path)
    assert list(steps) == ["fetch", "data", "export", "optimize", "validate", "gate", "serve.triton",
                           "serve.torchserve", "serve.tf_serving", "publish"]
    assert _local(steps["validate"]) == {"model": "fetch", "data": "data", "onnx": "optimize", "exported": "export"}
    assert _local(steps["gate"]) == {"metrics": "validate"} and steps["gate"].config.blocking
    assert steps["serve.triton"].after == ["digits-cnn:gate"]
    assert "verdicts" not in steps["serve.triton"].inputs  # a changed threshold does not rebuild archives
    publish = steps["publish"]
    assert publish.deliver_to == plan.bundle_dest == tmp_path / "artifacts" / "bundles" / "digits-cnn" / "v3"
    assert _local(publish)["serving.tf_serving"] == "serve.tf_serving" and _local(publish)["verdicts"] == "gate"
    assert all(s.deliver_to is None for s in plan.steps if s.stage != "publish")


def test_each_variant_is_its_own_chain_and_only_the_selected_gate_blocks(tmp_path):
    recipe = derive_recipe(tmp_path / "v.yaml", RECIPES / "digits-cnn.yaml", {
        "variants": [{"name": "int8", "kind": "int8-static"}, {"name": "half", "kind": "fp16"}], "select": "int8"})
    _, steps = _plan(recipe, tmp_path)
    assert _local(steps["quantize.int8"]) == {"onnx": "optimize", "data": "data", "metrics": "validate"}
    assert _local(steps["validate.int8"])["exported"] == "quantize.int8"  # localization runs on the variant itself
    assert _local(steps["gate.int8"]) == {"metrics": "validate.int8", "quantized": "quantize.int8"}
    assert [s for s, step in steps.items() if s.startswith("gate") and step.config.blocking] == ["gate.int8"]
    assert _local(steps["serve.triton"])["onnx"] == "quantize.int8"
    assert steps["serve.triton"].after == ["digits-cnn:gate.int8"]
    publish = _local(steps["publish"])
    assert publish["onnx"] == "quantize.int8" and publish["variant.half.verdicts"] == "gate.half"
    assert publish["variant.fp32.metrics"] == "validate"


def test_tuning_candidates_reuse_the_recipes_own_steps_and_the_winner_is_validated(tmp_path):
    _, steps = _plan(RECIPES / "tuned" / "bert-encoder-tuned.yaml", tmp_path)
    tune = steps["tune.cpu"]
    assert _local(tune)["cand.torchscript.f0.fp32"] == "optimize"  # the recipe's own export and fusion
    assert _local(tune)["cand.dynamo.f1.auto-int8-static-pc"] == "quantize.auto-int8-static-pc.dynamo.f1"
    assert "cand.torchscript.f0.auto-fp16" not in tune.inputs  # fp16 is not a cpu-profile precision
    assert "cand.torchscript.f0.auto-fp16" in steps["tune.cuda"].inputs
    assert steps["export.dynamo"].optional and steps["optimize.dynamo.f1"].optional and not tune.optional
    assert tune.config.publish and not steps["tune.cuda"].config.publish
    assert _local(steps["validate.tuned"])["session"] == "tune.cpu"
    assert _local(steps["gate.tuned"]) == {"metrics": "validate.tuned", "tuned": "tune.cpu"}
    assert _local(steps["publish"])["tune.cuda"] == "tune.cuda"
    order = list(steps)
    for step in steps.values():  # every step comes after what it reads
        for upstream in [*_local(step).values(), *(a.split(":", 1)[1] for a in step.after)]:
            assert order.index(upstream) < order.index(step.stage), (step.stage, upstream)
