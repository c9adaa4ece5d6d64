"""The scikit-learn source: pipelines logged with mlflow.sklearn (skops, infer_signature on numpy) built through
the real `kiln run` from recipes that name no `inputs`; parity against scikit-learn's own predict /
predict_proba, accuracy on the held-out split each run logs, the bundle served through the ONNX targets, and an
estimator skl2onnx cannot convert refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, base_env, kiln, run_fixture_script, run_json

pytestmark = pytest.mark.slow  # skl2onnx is a core dependency: no skip when it is missing

CLASSIFIERS = ["sk-gbc", "sk-rf", "sk-logreg"]
CLASSES = {"sk-gbc": 2, "sk-rf": 3, "sk-logreg": 3}


@pytest.fixture(scope="module")
def sk_registry(tmp_path_factory) -> str:
    """A fresh sqlite registry holding only the scikit-learn test models."""
    home = tmp_path_factory.mktemp("sk-registry")
    return run_fixture_script("register_sklearn.py", f"sqlite:///{home / 'mlflow.db'}")


def _recipe(folder: Path, name: str, labels: bool = True, extra: str = "") -> Path:
    """A recipe naming the source URI and the held-out split its run logged; no `inputs`, default gates."""
    path = folder / f"{name}.yaml"
    label = ", labels: labels" if labels else ""
    path.write_text(
        f"name: {name}\nsource: {{uri: 'models:/{name}@champion'}}\n"
        f"validation:\n  data: {{source: run_artifact, path: validation/test.npz{label}, samples: 500}}\n"
        f"  latency: {{batch_sizes: [1, 32]}}\n{extra}"
    )
    return path


@pytest.fixture(scope="module")
def bundles(sk_registry, tmp_path_factory) -> dict[str, Path]:
    """All four models built in one `kiln run`; the classifiers and the regressor also served (Triton,
    TorchServe) as any ONNX model is."""
    folder = tmp_path_factory.mktemp("sk-recipes")
    serving = "serving: {targets: [triton, torchserve]}\n"
    recipes = [_recipe(folder, n, extra=serving) for n in CLASSIFIERS]
    recipes.append(_recipe(folder, "sk-ridge", labels=False, extra=serving))
    result, summary = run_json(*map(str, recipes), "--tracking-uri", sk_registry,
                               "--artifacts", str(tmp_path_factory.mktemp("sk-artifacts")))
    assert result.returncode == 0, result.stderr[-3000:]
    return {r["recipe"]: Path(r["bundle"]) for r in summary["recipes"]}


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _split(registry: str, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """The held-out split logged in the model's run, as kiln's data stage read it."""
    import mlflow.artifacts

    path = mlflow.artifacts.download_artifacts(run_id=manifest["source"]["run_id"],
                                               artifact_path="validation/test.npz", tracking_uri=registry)
    with np.load(path) as data:
        return data["input"], data["labels"]


def _original(registry: str, manifest: dict):
    """The registered model as scikit-learn loads it (the autouse fixture undoes the tracking URI)."""
    import mlflow
    import mlflow.sklearn

    mlflow.set_tracking_uri(registry)
    mlflow.set_registry_uri(registry)
    return mlflow.sklearn.load_model(f"models:/{manifest['source']['name']}/{manifest['source']['version']}")


def _onnx(bundle: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_bundle_matches_predict_and_predict_proba(bundles, sk_registry, name):
    manifest = _manifest(bundles[name])
    assert manifest["gates"]["passed"]
    assert manifest["metrics"]["framework"] == "sklearn" and manifest["source"]["flavor"] == "sklearn"
    export = next(s["summary"] for s in manifest["steps"] if s["summary"].get("exporter"))
    assert export["exporter"] == "skl2onnx" and export["outputs"] == ["label", "probabilities"]
    outputs = manifest["metrics"]["outputs"]
    assert outputs["label"]["dtype"] == outputs["label"]["candidate_dtype"] == "int64"
    assert outputs["label"]["exact_agreement"] == 1.0
    assert outputs["probabilities"]["shape"][1] == CLASSES[name]
    assert outputs["probabilities"]["max_abs_error"] < 1e-5 and outputs["probabilities"]["top1_agreement"] == 1.0

    # Independently of kiln: the published graph against scikit-learn itself on the whole held-out split.
    x, y = _split(sk_registry, manifest)
    model = _original(sk_registry, manifest)
    label, probabilities = _onnx(bundles[name], x)
    reference = model.predict_proba(x)
    assert len(np.unique(model.predict(x))) == CLASSES[name]  # the reference varies across samples
    assert np.ptp(reference, axis=0).max() > 0.5
    np.testing.assert_array_equal(label, model.predict(x))
    np.testing.assert_allclose(probabilities, reference, atol=1e-5)

    # Accuracy on the labelled split, both models, and the same figure as scikit-learn's own.
    task = manifest["metrics"]["task"]
    assert task["output"] == "label" and task["samples"] == len(y) and task["drop"] == 0
    assert task["reference"] == pytest.approx(float((model.predict(x) == y).mean())) and task["reference"] > 0.85
    report = (bundles[name] / "report.md").read_text()
    assert "original = sklearn" in report and "| top-1 accuracy |" in report


def test_regressor_bundle_matches_predict(bundles, sk_registry):
    manifest = _manifest(bundles["sk-ridge"])
    assert manifest["gates"]["passed"] and manifest["metrics"]["task"] is None
    variable = manifest["metrics"]["outputs"]["variable"]
    assert variable["shape"][1] == 1 and variable["max_rel_error"] < 1e-9  # float64 end to end, as sklearn
    x, _ = _split(sk_registry, manifest)
    model = _original(sk_registry, manifest)
    (prediction,) = _onnx(bundles["sk-ridge"], x)
    assert np.std(model.predict(x)) > 10  # diabetes progression varies across patients
    np.testing.assert_allclose(prediction[:, 0], model.predict(x), rtol=1e-9)


def test_onnx_io_takes_what_the_signature_promises(bundles):
    """float64 in (infer_signature on numpy), int64 labels and float64 scores out, dynamic batch named."""
    import onnx

    graph = onnx.load(str(bundles["sk-gbc"] / "model.onnx")).graph
    io = {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
          for v in [*graph.input, *graph.output]}
    assert io == {"input": (11, ["batch", 30]), "label": (7, ["batch"]), "probabilities": (11, ["batch", 2])}
    assert not any(n.op_type == "ZipMap" for n in graph.node)


def test_speedup_is_measured_at_batch_1_and_32(bundles):
    for name, bundle in bundles.items():
        latency = _manifest(bundle)["metrics"]["latency"]
        assert set(latency) == {"1", "32"}, name
        assert all(t["speedup_p50"] > 0 and t["original"]["p50_ms"] > 0 for t in latency.values())
        assert "**speedup (p50)**" in (bundle / "report.md").read_text()


def test_triton_config_types_follow_the_graph(bundles):
    config = (bundles["sk-logreg"] / "serving/triton/sk-logreg/config.pbtxt").read_text()
    assert 'name: "input"\n    data_type: TYPE_FP64\n    dims: [ 4 ]' in config
    assert 'name: "label"\n    data_type: TYPE_INT64' in config
    assert (bundles["sk-logreg"] / "serving/torchserve/model-store/sk-logreg.mar").is_file()


def test_recipe_naming_only_the_source_uri_passes(sk_registry, tmp_path):
    """No inputs, no data, no gates: the signature and the model complete the spec; synthetic samples."""
    recipe = tmp_path / "sk-gbc.yaml"
    recipe.write_text("name: sk-gbc\nsource: {uri: 'models:/sk-gbc@champion'}\n")
    result, summary = run_json(str(recipe), "--tracking-uri", sk_registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = _manifest(Path(summary["recipes"][0]["bundle"]))
    assert manifest["gates"]["passed"] and manifest["metrics"]["outputs"]["label"]["exact_agreement"] == 1.0


def test_unconvertible_estimator_exits_2_in_one_line(sk_registry, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nsource: {uri: 'models:/sk-kernel-ridge@champion'}\n")
    result = kiln("run", str(recipe), "--tracking-uri", sk_registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("kiln:")]
    assert len(lines) == 1, result.stderr
    assert "models:/sk-kernel-ridge/1" in lines[0] and "skl2onnx cannot convert" in lines[0]
    assert "KernelRidge" in lines[0]
    assert not (tmp_path / "a" / "bundles" / "bad").exists()


@pytest.mark.server
def test_through_a_real_mlflow_server(mlflow_server, tmp_path):
    """One model logged to and built from a real `mlflow server` (served artifacts over HTTP)."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "register_sklearn.py"), mlflow_server,
                           "sk-gbc"], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result, summary = run_json(str(_recipe(tmp_path, "sk-gbc")), "--tracking-uri", mlflow_server,
                               "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = _manifest(Path(summary["recipes"][0]["bundle"]))
    assert manifest["gates"]["passed"] and manifest["metrics"]["task"]["reference"] > 0.9
    assert manifest["metrics"]["outputs"]["label"]["exact_agreement"] == 1.0
