"""TensorFlow Serving: the ORIGINAL TensorFlow model as a versioned SavedModel (TF Serving does not serve ONNX),
with warm-up requests built from the validation samples, models.config and batching_parameters.txt.

Layout under serving/tf_serving/:
    <name>/<version>/saved_model.pb, variables/, assets.extra/tf_serving_warmup_requests
    models.config              ModelServerConfig text proto (absolute base_path of the delivered bundle)
    batching_parameters.txt    BatchingParameters text proto
    sample_request.json        a REST predict request; expected outputs are in the bundle's sample_outputs.npz
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import numpy as np
import yaml
from pydantic import ConfigDict, Field

from pipeline.errors import KilnError, ModelError
from pipeline.schema import Strict
from stages.targets import TargetContext, Token


class Config(Strict):
    """The original TensorFlow SavedModel for TensorFlow Serving (TensorFlow/Keras sources only)."""

    model_config = ConfigDict(extra="forbid", title="TfServingTarget")

    max_batch_size: int = Field(32, ge=1)
    batch_timeout_micros: int | None = Field(None, ge=0, description="Default: from gates.latency.max_p95_ms")
    allowed_batch_sizes: list[Annotated[int, Field(ge=1)]] | None = Field(None, description="Default: powers of 2")
    num_batch_threads: int | None = Field(None, ge=1, description="Default: the validation thread count")
    max_enqueued_batches: int = Field(100, ge=1)
    version_labels: dict[Token, Annotated[str, Field(pattern=r"^(latest|[0-9]{1,18})$")]] = Field(
        default_factory=lambda: {"stable": "latest"}, description="label -> version ('latest' = the published one)")


SERVING_SIGNATURE = "serving_default"


def tools(config, inputs: dict[str, Path]) -> list[str]:
    return ["tensorflow-cpu", "tensorflow", "keras", "tensorflow-serving-api"]


def skip_reason(ctx: TargetContext) -> str | None:
    if ctx.source.get("flavor") != "tensorflow":
        return (
            f"TF Serving serves TensorFlow SavedModels and this model's source flavor is {ctx.source.get('flavor')}; "
            "use the triton or torchserve target"
        )
    return None


def _apis():
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError:
        raise KilnError(
            "serving.targets tf_serving needs tensorflow-serving-api: "
            "pip install --no-deps tensorflow-serving-api==2.21.0 (its protos use the installed TensorFlow)"
        ) from None
    return model_pb2, predict_pb2, prediction_log_pb2, model_server_config_pb2


def batching(ctx: TargetContext, config: dict) -> dict:
    """Batching settings, consistent with each other and with the latency budget, or a one-line error."""
    max_batch = config["max_batch_size"]
    allowed = config["allowed_batch_sizes"]
    if allowed is None:
        allowed = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
    if any(b >= a for a, b in zip(allowed[1:], allowed[:-1])) or any(b <= a for a, b in zip(allowed, allowed[1:])):
        raise ModelError(f"serving.tf_serving.allowed_batch_sizes {allowed}: must be strictly increasing")
    if allowed[-1] != max_batch:
        raise ModelError(
            f"serving.tf_serving.allowed_batch_sizes: the last entry ({allowed[-1]}) must equal max_batch_size ({max_batch})"
        )
    budget = ctx.latency_gates.get("max_p95_ms")
    budget_ms = min(budget.values()) if isinstance(budget, dict) else budget
    timeout = config["batch_timeout_micros"]
    if timeout is None:
        # Wait at most a tenth of the latency budget to fill a batch; 1 ms without a budget.
        timeout = int(budget_ms * 100) if budget_ms else 1000
    elif budget_ms and timeout >= budget_ms * 1000:
        raise ModelError(
            f"serving.tf_serving.batch_timeout_micros {timeout}: not below the p95 budget of {budget_ms} ms "
            "(gates.latency.max_p95_ms)"
        )
    return {
        "max_batch_size": max_batch,
        "batch_timeout_micros": timeout,
        "max_enqueued_batches": config["max_enqueued_batches"],
        "num_batch_threads": config["num_batch_threads"] or ctx.metrics.get("threads") or 1,
        "allowed_batch_sizes": allowed,
    }


def batching_text(params: dict) -> str:
    """BatchingParameters in protobuf text format (scalar fields are wrapper messages)."""
    lines = [f"{field} {{ value: {params[field]} }}" for field in
             ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")]
    lines += [f"allowed_batch_sizes: {size}" for size in params["allowed_batch_sizes"]]
    lines.append("pad_variable_length_inputs: false")
    return "\n".join(lines) + "\n"


def _export_keras(ctx: TargetContext, target: Path) -> str:
    """Keras model -> SavedModel whose serving_default takes the spec's input names and returns the output names."""
    import tensorflow as tf

    from stages.frameworks import tensorflow as tf_framework
    from stages.untrusted import require_trusted

    require_trusted(ctx.model_dir, ctx.source["uri"], ctx.allow_pickle)  # e.g. Keras custom objects pickled
    loaded = tf_framework.load(ctx.model_dir, ctx.source_options)
    model, names = loaded.model, list(ctx.expected)
    specs = tf_framework.tensor_specs(ctx.spec)
    input_names = [t.name for t in ctx.spec.inputs]

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=specs)
        def serve(self, *args):
            result = self.model(tf_framework.keras_inputs(input_names, args), training=False)
            result = result if isinstance(result, (list, tuple)) else [result]
            return dict(zip(names, result))

    module = Serving()
    tf.saved_model.save(module, str(target), signatures={SERVING_SIGNATURE: module.serve})
    return SERVING_SIGNATURE


def _copy_saved_model(ctx: TargetContext, target: Path) -> str:
    flavor = yaml.safe_load((ctx.model_dir / "MLmodel").read_text())["flavors"]["tensorflow"]
    shutil.copytree(ctx.model_dir / flavor.get("saved_model_dir", "tf2model"), target)
    return ctx.source_options.get("signature") or SERVING_SIGNATURE


def _warmup(ctx: TargetContext, version_dir: Path, signature: str) -> int:
    import tensorflow as tf

    _, predict_pb2, prediction_log_pb2, _ = _apis()
    folder = version_dir / "assets.extra"
    folder.mkdir(parents=True, exist_ok=True)
    count = next(iter(ctx.samples.values())).shape[0]
    with tf.io.TFRecordWriter(str(folder / "tf_serving_warmup_requests")) as writer:
        for i in range(count):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = ctx.name
            request.model_spec.signature_name = signature
            for name, array in ctx.samples.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(array[i : i + 1]))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return count


def models_config(ctx: TargetContext, version: int, labels: dict[str, str]) -> str:
    from google.protobuf import text_format

    _, _, _, model_server_config_pb2 = _apis()
    server = model_server_config_pb2.ModelServerConfig()
    entry = server.model_config_list.config.add()
    entry.name = ctx.name
    entry.base_path = str(ctx.bundle_dest / "serving" / "tf_serving" / ctx.name)
    entry.model_platform = "tensorflow"
    entry.model_version_policy.specific.versions.append(version)
    for label, value in labels.items():
        entry.version_labels[label] = version if value == "latest" else int(value)
    return text_format.MessageToString(server)


def build(ctx: TargetContext, config: dict, out: Path) -> dict:
    import tensorflow as tf

    _apis()
    if not ctx.version.isdigit():
        raise ModelError(f"TF Serving needs a numeric model version, got {ctx.version!r}")
    version = int(ctx.version)
    params = batching(ctx, config)
    for label, value in config["version_labels"].items():
        if value != "latest" and not str(value).isdigit():
            raise ModelError(f"serving.tf_serving.version_labels.{label}: {value!r} is not a version number or 'latest'")

    version_dir = out / ctx.name / str(version)
    flavor = yaml.safe_load((ctx.model_dir / "MLmodel").read_text())["flavors"]["tensorflow"]
    if flavor.get("model_type") == "keras":
        signature = _export_keras(ctx, version_dir)
    else:
        signature = _copy_saved_model(ctx, version_dir)

    # The SavedModel must reproduce the validated outputs through its serving signature, as TF Serving calls it.
    served = tf.saved_model.load(str(version_dir), tags=["serve"]).signatures[signature]
    got = served(**{name: tf.constant(array) for name, array in ctx.samples.items()})
    for name, expected in ctx.reference.items():
        if name not in got:
            raise ModelError(f"TF Serving SavedModel: signature '{signature}' has no output '{name}' (has {sorted(got)})")
        if not np.allclose(got[name].numpy(), expected, rtol=1e-4, atol=1e-5):
            raise ModelError(f"TF Serving SavedModel: output '{name}' differs from the original model's")
    warmups = _warmup(ctx, version_dir, signature)

    (out / "models.config").write_text(models_config(ctx, version, config["version_labels"]))
    (out / "batching_parameters.txt").write_text(batching_text(params))
    request = {"signature_name": signature, "inputs": {k: v.tolist() for k, v in ctx.samples.items()}}
    (out / "sample_request.json").write_text(json.dumps(request))
    root = ctx.bundle_dest / "serving" / "tf_serving"
    command = (
        "tensorflow_model_server --port=8500 --rest_api_port=8501 "
        f"--model_config_file={root}/models.config --enable_batching=true "
        f"--batching_parameters_file={root}/batching_parameters.txt --enable_model_warmup=true"
    )
    readme = "\n".join([
        "## TensorFlow Serving",
        "",
        f"`serving/tf_serving/{ctx.name}/{version}/` is the original TensorFlow model as a SavedModel (signature "
        f"`{signature}`, tag `serve`) with {warmups} warm-up requests; TF Serving does not serve ONNX.",
        "",
        "```bash",
        command,
        f"curl -s -d @{root}/sample_request.json http://127.0.0.1:8501/v1/models/{ctx.name}:predict",
        "```",
        "",
        f"Batching: max batch {params['max_batch_size']}, timeout {params['batch_timeout_micros']} µs, "
        f"allowed sizes {params['allowed_batch_sizes']}, {params['num_batch_threads']} batch threads. "
        "The outputs to expect are in `sample_outputs.npz` (the `outputs` field of the response, in the same order).",
    ])
    return {"signature": signature, "version": version, "warmup_requests": warmups, "batching": params,
            "command": command, "readme": readme}
