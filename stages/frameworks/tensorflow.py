"""TensorFlow models from MLflow's tensorflow flavor (Keras 3 models and tf.Module SavedModels): load, run with
TensorFlow itself, export with tf2onnx.

Keras models convert with `tf2onnx.convert.from_keras`; SavedModels convert from the signature the recipe
names (`source.signature`, default serving_default) with tf2onnx's own command line, the path its users take.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.errors import ModelError, first_line
from stages.frameworks import rename_tensor
from stages.tensors import ModelSpec

TOOLS = ["tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "mlflow"]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


@dataclass
class TFModel:
    kind: str  # "keras" or "saved_model"
    model: Any  # keras.Model, or the loaded SavedModel object
    path: Path  # model.keras file or SavedModel folder
    signature: str | None  # SavedModels: the signature that is called and converted
    fn: Any = None  # the traced callable

    def output_names(self, spec: ModelSpec) -> list[str]:
        if self.kind == "saved_model":
            keys = list(self.fn.structured_outputs)
            if spec.outputs:
                unknown = [n for n in spec.outputs if n not in keys]
                if unknown:
                    raise ModelError(
                        f"outputs: {unknown[0]!r} is not an output of signature '{self.signature}' (outputs: {keys})"
                    )
                return list(spec.outputs)
            return sorted(keys)
        names = list(getattr(self.model, "output_names", None) or [])
        return list(spec.outputs) if spec.outputs else names


def set_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TensorFlow already started in this worker; it keeps the threads it has


def _mlmodel(model_dir: Path) -> dict:
    return yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["tensorflow"]


def load(model_dir: Path, options: dict | None = None) -> TFModel:
    import tensorflow as tf

    signature = (options or {}).get("signature") or "serving_default"
    flavor = _mlmodel(model_dir)
    if flavor.get("model_type") == "keras":
        import keras

        path = model_dir / flavor.get("data", "data") / "model.keras"
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"Keras model {path.name}: cannot be loaded: {type(exc).__name__}: {exc}") from None
        return TFModel("keras", model, path, None)
    path = model_dir / flavor.get("saved_model_dir", "tf2model")
    if not (path / "variables").is_dir():
        raise ModelError(f"SavedModel {path.name}/: its variables/ folder is missing; re-log the model with its variables")
    try:
        loaded = tf.saved_model.load(str(path), tags=["serve"])
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"SavedModel {path.name}/: tf.saved_model.load failed: {first_line(exc, 200)}") from None
    signatures = list(loaded.signatures.keys())
    if signature not in signatures:
        raise ModelError(f"source.signature: '{signature}' is not in the SavedModel (it has: {', '.join(signatures) or 'none'})")
    return TFModel("saved_model", loaded, path, signature, loaded.signatures[signature])


def _keras_inputs(model) -> list[dict]:
    """A Keras model's inputs as its Input layers name them (None sizes are dynamic: -1)."""
    return [{"name": t.name, "dtype": str(t.dtype), "shape": [-1 if d is None else int(d) for d in t.shape]}
            for t in model.inputs]


def _signature_inputs(fn) -> list[dict]:
    """A SavedModel signature's inputs, by the names it is called with (its keyword arguments)."""
    _, named = fn.structured_input_signature
    return [{"name": name, "dtype": spec.dtype.name, "shape": [-1 if d is None else int(d) for d in spec.shape]}
            for name, spec in named.items()]


def model_inputs(model_dir: Path, options: dict | None = None) -> list[dict]:
    """The model's own inputs, for MLflow signatures that leave them unnamed (infer_signature on numpy arrays):
    Keras' `model.inputs`, or the input names of the SavedModel signature the recipe calls."""
    model = load(model_dir, options)
    return _keras_inputs(model.model) if model.kind == "keras" else _signature_inputs(model.fn)


def _tensors(spec: ModelSpec, feeds: dict[str, np.ndarray]):
    import tensorflow as tf

    return [tf.constant(np.ascontiguousarray(feeds[t.name])) for t in spec.inputs]


def _call(model: TFModel, spec: ModelSpec, tensors):
    if model.kind == "saved_model":
        return model.fn(**{t.name: x for t, x in zip(spec.inputs, tensors)})
    if model.fn is None:
        # Graph mode, traced once for every batch size (dynamic axes are None), as a server would run it.
        import tensorflow as tf

        keras_model = model.model
        names = [t.name for t in spec.inputs]
        model.fn = tf.function(
            lambda *args: keras_model(keras_inputs(names, args), training=False),
            input_signature=tensor_specs(spec),
        )
    return model.fn(*tensors)


def _ordered(model: TFModel, spec: ModelSpec, result) -> list[np.ndarray]:
    if isinstance(result, dict):
        names = model.output_names(spec)
        return [np.asarray(result[n]) for n in names]
    if isinstance(result, (list, tuple)):
        return [np.asarray(r) for r in result]
    return [np.asarray(result)]


def keras_inputs(names: list[str], tensors):
    """One tensor, or a dict by input name: Keras matches dicts to its Input layers by name, lists by position."""
    return tensors[0] if len(tensors) == 1 else dict(zip(names, tensors))


def predict(model: TFModel, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _ordered(model, spec, _call(model, spec, _tensors(spec, feeds)))


def runner(model: TFModel, spec: ModelSpec, feeds: dict[str, np.ndarray]):
    tensors = _tensors(spec, feeds)
    return lambda: _call(model, spec, tensors)


def tensor_specs(spec: ModelSpec):
    import tensorflow as tf

    return [
        tf.TensorSpec([None if isinstance(d, str) else d for d in t.shape], tf.as_dtype(t.dtype), name=t.name)
        for t in spec.inputs
    ]


def export_onnx(model: TFModel, spec: ModelSpec, feeds, output_names: list[str], exporter: str, opset: int, path: Path) -> dict:
    import onnx

    if model.kind == "keras":
        import tf2onnx

        try:
            proto, _ = tf2onnx.convert.from_keras(model.model, input_signature=tensor_specs(spec), opset=opset)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"export: tf2onnx could not convert the Keras model: {type(exc).__name__}: {first_line(exc, 250)}") from None
        onnx.save(proto, str(path))
    else:
        command = [
            sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(model.path), "--tag", "serve",
            "--signature_def", model.signature, "--opset", str(opset), "--output", str(path),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not path.exists():
            raise ModelError(f"export: tf2onnx could not convert signature '{model.signature}': {_last_error(done.stderr)}")
    proto = onnx.load(str(path))
    unsupported = _unsupported_ops(proto)
    if unsupported:
        raise ModelError(f"export: tf2onnx left TensorFlow ops it cannot convert: {', '.join(unsupported)}")
    _name_outputs(proto, output_names)
    onnx.save(proto, str(path))
    return {"exporter": "tf2onnx", "opset": opset, "kind": model.kind, "signature": model.signature}


def _name_outputs(proto, names: list[str]) -> None:
    """Order and name the graph outputs as the original model's outputs (tf2onnx may name them otherwise)."""
    graph_outputs = list(proto.graph.output)
    by_name = {o.name: o for o in graph_outputs}
    if all(n in by_name for n in names):
        ordered = [by_name[n] for n in names]
    elif len(names) == len(graph_outputs):
        ordered = graph_outputs
        for output, new in zip(graph_outputs, names):
            rename_tensor(proto.graph, output.name, new)
    else:
        raise ModelError(f"outputs: {len(names)} names given but the converted graph has {len(graph_outputs)} outputs")
    del proto.graph.output[:]
    proto.graph.output.extend(ordered)


def _unsupported_ops(proto) -> list[str]:
    import onnx.defs

    standard = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
    found = set()
    for node in proto.graph.node:
        if node.domain not in standard:
            found.add(f"{node.domain}.{node.op_type}")
        elif node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            found.add(node.op_type)
    return sorted(found)


def _last_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "failure" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def layer_outputs(model: TFModel, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """(layer name, layer type, output) for every layer of a functional Keras model; SavedModel signatures
    expose no layers."""
    if model.kind != "keras":
        return []
    import keras

    layers = [layer for layer in model.model.layers if not isinstance(layer, keras.layers.InputLayer)]
    layers = [layer for layer in layers if not isinstance(layer.output, (list, tuple))]
    if not layers:
        return []
    probe = keras.Model(model.model.inputs, [layer.output for layer in layers])
    tensors = _tensors(spec, feeds)
    outputs = probe(keras_inputs([t.name for t in spec.inputs], tensors), training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [(layer.name, type(layer).__name__, np.asarray(out)) for layer, out in zip(layers, outputs)]
