"""ONNX sources: models logged with `mlflow.onnx` (MLflow's default external data, and inline), built by recipes
that name only the source URI, validated against the logged graph itself under ONNX Runtime with optimizations
off; external data that points out of the model's folder is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import base_env, kiln, run_fixture_script, run_json

MODELS = ("digits-onnx", "digits-onnx-inline")


def _recipe(folder: Path, name: str, extra: str = "", model: str | None = None) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nsource: {{uri: 'models:/{model or name}@champion'}}\n{extra}")
    return path


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("kiln:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def onnx_registry(tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("onnx-registry")
    return run_fixture_script("register_onnx.py", f"sqlite:///{home / 'mlflow.db'}")


@pytest.fixture(scope="module")
def built(onnx_registry, tmp_path_factory) -> dict[str, Path]:
    """Both digits models built in one real `kiln run` from recipes that name only the source URI."""
    folder = tmp_path_factory.mktemp("onnx-recipes")
    recipes = [str(_recipe(folder, name)) for name in MODELS]
    result, summary = run_json(*recipes, "--tracking-uri", onnx_registry, "--artifacts", str(folder / "artifacts"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {r["recipe"]: Path(r["bundle"]) for r in summary["recipes"]}


@pytest.mark.slow
def test_mlflow_default_logs_external_data(onnx_registry, tmp_path):
    """What the test models are: MLflow 3.17's default (save_as_external_data=True) moved the weights out of
    model.onnx into a .data file beside it; save_as_external_data=False kept one file."""
    import mlflow
    import mlflow.artifacts
    import onnx
    from onnx.external_data_helper import uses_external_data

    client = mlflow.MlflowClient(tracking_uri=onnx_registry, registry_uri=onnx_registry)
    for name, external in (("digits-onnx", True), ("digits-onnx-inline", False)):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri(name, "1"),
                                                         dst_path=str(tmp_path / name), tracking_uri=onnx_registry))
        proto = onnx.load(str(local / "model.onnx"), load_external_data=False)
        assert any(uses_external_data(t) for t in proto.graph.initializer) is external
        assert bool(list(local.glob("*.data"))) is external


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_bundle_has_parity_against_the_logged_graph(built, name):
    bundle = built[name]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["gates"]["passed"]
    assert manifest["metrics"]["framework"] == "onnx"
    export = next(s["summary"] for s in manifest["steps"] if s["stage"] == "export")
    assert export["exporter"] == "onnx" and export["opset"] == 17
    assert (export["external_data_inlined_bytes"] > 0) is (name == "digits-onnx")
    # No `outputs` in the recipe and none named by the signature: the graph's own output name.
    assert export["outputs"] == ["probabilities"]
    out = manifest["metrics"]["outputs"]["probabilities"]
    assert out["cosine"] > 0.9999 and out["top1_agreement"] == 1.0 and out["max_abs_error"] < 1e-5
    # The reference is worth comparing against: it differs between samples, in values and in the class chosen.
    reference = np.load(bundle / "sample_outputs.npz")["probabilities"]
    assert reference.std(axis=0).max() > 1e-2
    assert len(set(reference.argmax(axis=1).tolist())) > 1
    report = (bundle / "report.md").read_text()
    assert "original = onnx" in report and "| probabilities |" in report


@pytest.mark.slow
def test_bundle_model_is_self_contained(built):
    import onnx
    from onnx.external_data_helper import uses_external_data

    bundle = built["digits-onnx"]
    assert not list(bundle.rglob("*.data"))
    onnx.checker.check_model(str(bundle / "model.onnx"), full_check=True)
    model = onnx.load(str(bundle / "model.onnx"))
    assert not any(uses_external_data(t) for t in model.graph.initializer)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == "pixels" and dims == ["batch", 64]


@pytest.mark.slow
def test_held_out_digits_accuracy_and_output_rename(onnx_registry, tmp_path):
    """The run's labelled held-out split as validation data, and the recipe's `outputs` and `inputs` as
    overrides: the bundle's graph output takes the recipe's name."""
    recipe = _recipe(tmp_path, "digits-onnx-labelled", model="digits-onnx", extra=(
        "inputs: [{name: pixels, dtype: float32, shape: [batch, 64]}]\n"
        "outputs: [class_probabilities]\n"
        "validation: {data: {source: run_artifact, path: validation/digits-test.npz, labels: y, samples: 200}}\n"))
    result, summary = run_json(str(recipe), "--tracking-uri", onnx_registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = Path(summary["recipes"][0]["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    task = manifest["metrics"]["task"]
    assert task["reference"] > 0.9 and task["candidate"] == task["reference"]
    assert list(manifest["metrics"]["outputs"]) == ["class_probabilities"]
    import onnx

    assert [o.name for o in onnx.load(str(bundle / "model.onnx")).graph.output] == ["class_probabilities"]


@pytest.mark.slow
@pytest.mark.parametrize("name,location", [("onnx-escape", "../escape.bin"), ("onnx-escape-absolute", "/tmp/escape.bin")])
def test_external_data_outside_the_model_is_refused(onnx_registry, tmp_path, name, location):
    artifacts = tmp_path / "a"
    result = kiln("run", str(_recipe(tmp_path, name)), "--tracking-uri", onnx_registry, "--artifacts", str(artifacts))
    assert result.returncode == 2, result.stderr[-2000:]
    line = _one_error_line(result.stderr)
    assert f"models:/{name}/1" in line and f"'{location}'" in line and "outside the model's folder" in line
    assert not (artifacts / "bundles" / name).exists()


@pytest.mark.slow
def test_against_a_real_mlflow_server(mlflow_server, tmp_path):
    run_fixture_script("register_onnx.py", mlflow_server)
    env = base_env(MLFLOW_TRACKING_URI=mlflow_server)
    result, summary = run_json(str(_recipe(tmp_path, "digits-onnx")), "--artifacts", str(tmp_path / "a"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((Path(summary["recipes"][0]["bundle"]) / "manifest.json").read_text())
    assert manifest["gates"]["passed"] and manifest["metrics"]["outputs"]["probabilities"]["top1_agreement"] == 1.0
    assert manifest["source"]["uri"] == "models:/digits-onnx/1"


def _folder_with_location(tmp_path: Path, location: str) -> Path:
    """An MLflow onnx model folder whose one initializer's external data is at `location`."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
    weight = TensorProto(name="weight", data_type=TensorProto.FLOAT, dims=[2, 2], data_location=TensorProto.EXTERNAL)
    weight.external_data.add(key="location", value=location)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], initializer=[weight])
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    return folder


def test_external_data_through_a_link_out_is_refused(tmp_path):
    from pipeline.errors import ModelError
    from stages.frameworks import onnx as onnx_source

    (tmp_path / "outside.bin").write_bytes(np.eye(2, dtype=np.float32).tobytes())
    folder = _folder_with_location(tmp_path, "weights.bin")
    os.symlink(tmp_path / "outside.bin", folder / "weights.bin")
    with pytest.raises(ModelError, match="'weights.bin' is outside the model's folder"):
        onnx_source.model_inputs(folder)


def test_inputs_come_from_the_graph(tmp_path):
    from stages.frameworks import onnx as onnx_source

    folder = _folder_with_location(tmp_path, "weights.bin")
    (folder / "weights.bin").write_bytes(np.eye(2, dtype=np.float32).tobytes())
    assert onnx_source.model_inputs(folder) == [{"name": "x", "dtype": "float32", "shape": [-1, 2]}]
    assert onnx_source.model_outputs(folder) == ["y"]
    model = onnx_source.load(folder)
    from stages.tensors import ModelSpec, TensorSpec

    spec = ModelSpec([TensorSpec("x", "float32", ["batch", 2])], ["y"])
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(onnx_source.predict(model, spec, {"x": x})[0], x)


def test_large_model_keeps_external_data_in_one_file_beside_the_export(tmp_path, monkeypatch):
    """Over the external-data threshold (lowered here; ~2 GiB by default) the export is not inlined: its
    initializers go to model.onnx.data beside model.onnx, whatever file the logged model used."""
    import onnx
    from onnx import TensorProto, helper

    from stages import artifacts
    from stages.frameworks import onnx as onnx_source
    from stages.tensors import ModelSpec, TensorSpec

    folder = tmp_path / "model"
    (folder / "weights").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
    values = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    (folder / "weights" / "w.bin").write_bytes(values.tobytes())
    weight = TensorProto(name="weight", data_type=TensorProto.FLOAT, dims=[32, 32], data_location=TensorProto.EXTERNAL)
    weight.external_data.add(key="location", value="weights/w.bin")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], initializer=[weight])
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    spec = ModelSpec([TensorSpec("x", "float32", ["batch", 32])], ["y"])
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    model = onnx_source.load(folder)
    for threshold, files in (("2048", ["model.onnx", "model.onnx.data"]), (None, ["model.onnx"])):
        if threshold:
            monkeypatch.setenv(artifacts.EXTERNAL_DATA_ENV, threshold)
        else:
            monkeypatch.delenv(artifacts.EXTERNAL_DATA_ENV)
        out = tmp_path / f"export-{threshold}"
        out.mkdir()
        done = onnx_source.export_onnx(model, spec, {"x": x}, ["y"], "onnx", 18, out / "model.onnx")
        assert sorted(p.name for p in out.iterdir()) == files
        assert done["external_data_kept_bytes" if threshold else "external_data_inlined_bytes"] == values.nbytes
        np.testing.assert_allclose(_run_x(out / "model.onnx", x), x @ values, rtol=1e-5, atol=1e-5)


def _run_x(path: Path, x: np.ndarray) -> np.ndarray:
    from stages import onnx_runtime

    return onnx_runtime.run(onnx_runtime.session(path), {"x": x})[0]
