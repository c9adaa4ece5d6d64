"""The TensorFlow / Keras path: tf2onnx export, parity against TensorFlow itself, and the TF Serving bundle
checked the way TF Serving reads it (its protos, TF's SavedModel loader, saved_model_cli, TFRecord warm-up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import RECIPES, base_env, derive_recipe, kiln, run_fixture_script, run_json

pytestmark = pytest.mark.slow
tf = pytest.importorskip("tensorflow", reason="the tf extra is part of make test; install it with make install")


@pytest.fixture(scope="module")
def tf_registry(registry):
    """The session registry plus the TF-only test models (two-input Keras, SavedModels with odd signatures)."""
    return run_fixture_script("tf_models.py", registry)


@pytest.fixture(scope="module")
def keras_bundle(registry, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("tf-artifacts")
    result, summary = run_json(str(RECIPES / "digits-keras.yaml"), "--tracking-uri", registry,
                               "--artifacts", str(artifacts))
    assert result.returncode == 0, result.stderr
    return Path(summary["recipes"][0]["bundle"])


def _recipe(tmp_path: Path, name: str, uri: str, signature: str = "serving_default", extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nsource: {{uri: '{uri}', signature: {signature}}}\n"
        "validation: {data: {source: synthetic, samples: 8}}\n"
        f"serving: {{targets: [tf_serving]}}\n{extra}"
    )
    return path


def test_keras_example_has_parity_against_tensorflow(keras_bundle):
    manifest = json.loads((keras_bundle / "manifest.json").read_text())
    assert manifest["gates"]["passed"]
    assert manifest["metrics"]["framework"] == "tensorflow"
    assert manifest["steps"][2]["summary"]["exporter"] == "tf2onnx"
    out = manifest["metrics"]["outputs"]["probabilities"]
    assert out["max_abs_error"] < 1e-5 and out["top1_agreement"] == 1.0
    assert manifest["metrics"]["task"]["reference"] > 0.9
    # every Keras layer found in the tf2onnx graph despite Keras' uniquified scope names (dense -> dense_1 ...)
    localization = manifest["metrics"]["localization"]
    assert localization["layers_matched"] == localization["layers_in_model"] == 3
    assert localization["first_divergent"] is None
    report = (keras_bundle / "report.md").read_text()
    assert "| 1 | tensorflow |" in report and "original = tensorflow" in report


def test_onnx_dims_carry_the_axis_names(keras_bundle):
    import onnx

    model = onnx.load(str(keras_bundle / "model.onnx"))
    for value in [*model.graph.input, *model.graph.output]:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims[0] == "batch", (value.name, dims)
        assert not any(str(d).startswith("unk__") for d in dims)


def test_models_config_parses_as_model_server_config(keras_bundle):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse((keras_bundle / "serving/tf_serving/models.config").read_text(),
                               model_server_config_pb2.ModelServerConfig())
    (entry,) = config.model_config_list.config
    assert entry.name == "digits-keras" and entry.model_platform == "tensorflow"
    base = Path(entry.base_path)
    assert base.is_absolute() and base.is_dir()
    assert list(entry.model_version_policy.specific.versions) == [1]
    assert dict(entry.version_labels) == {"stable": 1}
    assert [p.name for p in base.iterdir()] == ["1"]


def _batching_parameters_class():
    """TF Serving's BatchingParameters message, declared from its published definition
    (tensorflow_serving/servables/tensorflow/session_bundle_config.proto: field names, numbers and types).
    No installable package ships it; the text file is parsed against this declaration by protobuf itself."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    for module in (wrappers_pb2,):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    file = descriptor_pb2.FileDescriptorProto(name="batching.proto", package="tensorflow.serving", syntax="proto3",
                                              dependency=["google/protobuf/wrappers.proto"])
    message = file.message_type.add(name="BatchingParameters")
    F = descriptor_pb2.FieldDescriptorProto
    for number, name, kind, type_name, label in [
        (1, "max_batch_size", F.TYPE_MESSAGE, ".google.protobuf.Int64Value", F.LABEL_OPTIONAL),
        (2, "batch_timeout_micros", F.TYPE_MESSAGE, ".google.protobuf.Int64Value", F.LABEL_OPTIONAL),
        (3, "max_enqueued_batches", F.TYPE_MESSAGE, ".google.protobuf.Int64Value", F.LABEL_OPTIONAL),
        (4, "num_batch_threads", F.TYPE_MESSAGE, ".google.protobuf.Int64Value", F.LABEL_OPTIONAL),
        (5, "thread_pool_name", F.TYPE_MESSAGE, ".google.protobuf.StringValue", F.LABEL_OPTIONAL),
        (6, "allowed_batch_sizes", F.TYPE_INT64, None, F.LABEL_REPEATED),
        (7, "pad_variable_length_inputs", F.TYPE_BOOL, None, F.LABEL_OPTIONAL),
    ]:
        field = message.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


def test_batching_parameters_are_valid_and_consistent(keras_bundle):
    from google.protobuf import text_format

    params = text_format.Parse((keras_bundle / "serving/tf_serving/batching_parameters.txt").read_text(),
                               _batching_parameters_class()())
    allowed = list(params.allowed_batch_sizes)
    # TF Serving's own rules: increasing, and the last equals max_batch_size
    assert allowed == sorted(set(allowed)) and allowed[-1] == params.max_batch_size.value == 32
    assert 0 < params.batch_timeout_micros.value and params.num_batch_threads.value >= 1
    # and TensorFlow's batching kernel accepts exactly these settings
    batched = tf.nondifferentiable_batch_function(
        num_batch_threads=params.num_batch_threads.value, max_batch_size=params.max_batch_size.value,
        batch_timeout_micros=params.batch_timeout_micros.value, allowed_batch_sizes=allowed,
        max_enqueued_batches=params.max_enqueued_batches.value,
    )(lambda x: x * 2.0)
    np.testing.assert_allclose(batched(tf.ones((3, 2))).numpy(), np.full((3, 2), 2.0))


def test_saved_model_loads_and_reproduces_outputs(keras_bundle):
    version_dir = keras_bundle / "serving/tf_serving/digits-keras/1"
    loaded = tf.saved_model.load(str(version_dir), tags=["serve"])
    serve = loaded.signatures["serving_default"]
    with np.load(keras_bundle / "sample_inputs.npz") as inputs, np.load(keras_bundle / "sample_outputs.npz") as outputs:
        got = serve(features=tf.constant(inputs["features"]))
        np.testing.assert_allclose(got["probabilities"].numpy(), outputs["probabilities"], rtol=1e-4, atol=1e-5)
    cli = subprocess.run([str(Path(sys.executable).parent / "saved_model_cli"), "show", "--dir", str(version_dir),
                          "--tag_set", "serve", "--signature_def", "serving_default"],
                         capture_output=True, text=True, env=base_env(TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert "features" in cli.stdout and "probabilities" in cli.stdout


def test_warmup_records_are_prediction_logs(keras_bundle):
    from tensorflow_serving.apis import prediction_log_pb2

    path = keras_bundle / "serving/tf_serving/digits-keras/1/assets.extra/tf_serving_warmup_requests"
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    assert len(records) == 4
    request = records[0].predict_log.request
    assert request.model_spec.name == "digits-keras" and request.model_spec.signature_name == "serving_default"
    assert tf.make_ndarray(request.inputs["features"]).shape == (1, 64)


def test_pytorch_source_skips_tf_serving_with_a_reason(registry, tmp_path):
    recipe = derive_recipe(tmp_path / "cnn.yaml", RECIPES / "digits-cnn.yaml", {"serving": {"targets": ["tf_serving"]}})
    result, summary = run_json(str(recipe), "--tracking-uri", registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    bundle = Path(summary["recipes"][0]["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "source flavor is pytorch" in manifest["serving"]["tf_serving"]["skipped"]
    assert not (bundle / "serving" / "tf_serving").exists()
    assert "Not generated: TF Serving serves TensorFlow SavedModels" in (bundle / "README.md").read_text()


def test_two_input_keras_and_non_default_signature_pass(tf_registry, tmp_path):
    recipes = [
        _recipe(tmp_path, "two-inputs", "models:/two-input-keras@champion"),
        _recipe(tmp_path, "scorer", "models:/scorer@champion", signature="score"),
    ]
    result, summary = run_json(*map(str, recipes), "--tracking-uri", tf_registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    for outcome in summary["recipes"]:
        manifest = json.loads((Path(outcome["bundle"]) / "manifest.json").read_text())
        assert manifest["gates"]["passed"], outcome
    scorer = next(r for r in summary["recipes"] if r["recipe"] == "scorer")
    version_dir = Path(scorer["bundle"]) / "serving/tf_serving/scorer" / scorer["version"]
    assert list(tf.saved_model.load(str(version_dir)).signatures) == ["score"]
    two = next(r for r in summary["recipes"] if r["recipe"] == "two-inputs")
    inputs = json.loads((Path(two["bundle"]) / "manifest.json").read_text())["model"]["inputs"]
    assert [(i["name"], i["shape"]) for i in inputs] == [("a", ["batch", 64]), ("b", ["batch", 8])]


@pytest.mark.parametrize(
    "model, signature, message",
    [
        ("scorer", "nope", "source.signature: 'nope' is not in the SavedModel (it has: score)"),
        ("no-variables", "score", "models:/no-variables/1: SavedModel tf2model/: its variables/ folder is missing"),
        ("svd-model", "svd", "export: tf2onnx left TensorFlow ops it cannot convert: Svd"),
    ],
)
def test_bad_tensorflow_inputs_exit_2(tf_registry, tmp_path, model, signature, message):
    recipe = _recipe(tmp_path, "bad", f"models:/{model}@champion", signature=signature)
    result = kiln("run", str(recipe), "--tracking-uri", tf_registry, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("kiln:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "a" / "bundles" / "bad").exists()
