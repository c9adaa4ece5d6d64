"""Models as real registries hold them: logged with MLflow 3's defaults (PyTorch: the pt2 torch.export format with
an input example) and signatures inferred from numpy arrays (unnamed tensors). A recipe naming only the model
builds them; the names come from the model itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import kiln, run_fixture_script, run_json

pytestmark = pytest.mark.slow

# model -> (framework, the input name the model itself gives, the digits as that model takes them)
MODELS = {
    "digits-cnn-pt2": ("pytorch", "pixels", (-1, 1, 8, 8)),
    "digits-cnn-pickle": ("pytorch", "pixels", (-1, 1, 8, 8)),  # forward()'s parameter name
    "digits-keras-inferred": ("tensorflow", "features", (-1, 64)),
}


@pytest.fixture(scope="module")
def defaults_registry(tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("defaults-registry")
    return run_fixture_script("register_defaults.py", f"sqlite:///{home / 'mlflow.db'}")


def _recipe(tmp_path: Path, model: str, extra: str = "") -> Path:
    """Only the name and the model: no inputs, no outputs, default data, gates and exporter."""
    path = tmp_path / f"{model}.yaml"
    trusted = ", allow_pickle: true" if model.endswith("-pickle") else ""  # logged by our own fixture
    path.write_text(f"name: {model}\nsource: {{uri: 'models:/{model}@champion'{trusted}}}\n{extra}")
    return path


def _build(registry: str, tmp_path: Path, model: str) -> Path:
    result, summary = run_json(str(_recipe(tmp_path, model)), "--tracking-uri", registry,
                               "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(summary["recipes"][0]["bundle"])


def _digits(shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data[:200] / 16.0).astype(np.float32).reshape(shape), digits.target[:200]


def _original(registry: str, model: str, framework: str, x: np.ndarray) -> np.ndarray:
    """The model as its MLflow flavor loads it, run on x (independently of kiln)."""
    import mlflow

    uri = f"models:/{model}@champion"
    mlflow.set_registry_uri(registry)
    mlflow.set_tracking_uri(registry)
    if framework == "pytorch":
        import mlflow.pytorch
        import torch

        with torch.inference_mode():
            return mlflow.pytorch.load_model(uri)(torch.from_numpy(x)).numpy()
    import mlflow.tensorflow

    return np.asarray(mlflow.tensorflow.load_model(uri)(x, training=False))


def _check_bundle(bundle: Path, registry: str, model: str) -> None:
    import onnx
    import onnxruntime as ort

    framework, input_name, shape = MODELS[model]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["gates"]["passed"] and manifest["metrics"]["framework"] == framework
    (parity,) = manifest["metrics"]["outputs"].values()
    assert parity["max_abs_error"] < 1e-4 and parity["top1_agreement"] == 1.0, parity
    report = (bundle / "report.md").read_text()
    assert f"original = {framework}" in report and "## Parity" in report
    # The ONNX graph takes the model's own input name, with a dynamic batch the export proved at two sizes.
    graph = onnx.load(str(bundle / "model.onnx")).graph
    assert [i.name for i in graph.input] == [input_name]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # Independently of kiln: on real digits the original's outputs differ between samples (a reference worth
    # comparing with), it is accurate, and the bundle's graph agrees with it.
    x, labels = _digits(shape)
    reference = _original(registry, model, framework, x)
    candidate = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {input_name: x})[0]
    assert len(set(reference.argmax(1))) == 10 and float(np.std(reference, axis=0).min()) > 1e-3
    assert (reference.argmax(1) == labels).mean() > 0.8
    np.testing.assert_allclose(candidate, reference, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("model", list(MODELS))
def test_a_recipe_naming_only_the_model_builds_a_passing_bundle(defaults_registry, tmp_path, model):
    bundle = _build(defaults_registry, tmp_path, model)
    _check_bundle(bundle, defaults_registry, model)
    manifest = json.loads((bundle / "manifest.json").read_text())
    export = next(s["summary"] for s in manifest["steps"] if s["stage"] == "export")
    if MODELS[model][0] == "pytorch":
        # pt2: exported from the torch.export program itself, by the dynamo exporter
        assert export.get("serialization") == ("pt2" if model.endswith("pt2") else None)
        assert export["exporter"] == "dynamo"
        # a pt2 module calls no submodules, yet every layer is compared (from the ops' recorded module stack)
        localization = manifest["metrics"]["localization"]
        assert localization["layers_matched"] == localization["layers_in_model"] == 11, localization
        assert localization["first_divergent"] is None
    else:
        assert export["exporter"] == "tf2onnx"


def test_the_pt2_model_builds_from_a_real_mlflow_server(mlflow_server, tmp_path):
    registry = run_fixture_script("register_defaults.py", mlflow_server)
    bundle = _build(registry, tmp_path, "digits-cnn-pt2")
    _check_bundle(bundle, registry, "digits-cnn-pt2")


def test_a_one_row_example_gives_a_program_with_a_fixed_batch_and_a_bundle_at_that_batch(defaults_registry, tmp_path):
    """torch.export specializes a size-1 axis, so a one-row input example gives a program that only takes
    batch 1 (its module guards it). The bundle is built at that fixed batch, not widened beyond what was proved."""
    import onnx

    bundle = _build(defaults_registry, tmp_path, "digits-cnn-pt2-one")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["gates"]["passed"] and list(manifest["metrics"]["latency"]) == ["1"]
    dims = [d.dim_value for d in onnx.load(str(bundle / "model.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 1, 8, 8]


def _refused(registry: str, tmp_path: Path, model: str, extra: str = "") -> str:
    """`kiln run` on the model exits 2 with exactly one error line and publishes nothing; returns that line."""
    result = kiln("run", str(_recipe(tmp_path, model, extra)), "--tracking-uri", registry,
                  "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("kiln:")]
    assert len(lines) == 1, result.stderr
    assert not (tmp_path / "a" / "bundles").exists()
    return lines[0]


def test_a_pt2_program_torch_onnx_cannot_convert_exits_2_naming_the_model(defaults_registry, tmp_path):
    line = _refused(defaults_registry, tmp_path, "svd-pt2")
    assert "models:/svd-pt2/1" in line and "No ONNX function found for aten._linalg_svd" in line, line


def test_the_torchscript_exporter_on_a_pt2_program_exits_2(defaults_registry, tmp_path):
    line = _refused(defaults_registry, tmp_path, "digits-cnn-pt2", "export: {exporter: torchscript}\n")
    assert "models:/digits-cnn-pt2/1" in line and "export.exporter torchscript" in line and "dynamo" in line, line


def test_an_unsupported_flavor_exits_2_naming_the_model(defaults_registry, tmp_path):
    """A custom pyfunc model has only the python_function flavor: refused by fetch for that (before any trust
    check: the message says what kiln converts)."""
    line = _refused(defaults_registry, tmp_path, "plain-pyfunc")
    assert "models:/plain-pyfunc/1" in line and "['python_function'] include none kiln can convert" in line, line
