"""scikit-learn models from MLflow's sklearn flavor (estimators and pipelines): load, run with scikit-learn
itself, export with skl2onnx.

Classifiers export two outputs, the label and the class probabilities as one tensor (ZipMap off, so every
runtime and server reads a plain float tensor); regressors export their prediction. The ONNX graph computes in
float32 (every skl2onnx converter supports it; scikit-learn's trees compare in float32 anyway). Its input keeps
the dtype the model's signature declares (MLflow's `infer_signature` on numpy data says float64): a Cast at the
front of the graph turns it into float32, so clients send what the signature promises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import ModelError, first_line
from stages.frameworks import rename_tensor
from stages.tensors import ModelSpec

TOOLS = ["scikit-learn", "skl2onnx", "onnx", "mlflow", "skops"]
CLASSIFIER_OUTPUTS = ["label", "probabilities"]
REGRESSOR_OUTPUTS = ["variable"]


def set_threads(threads: int) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)  # BLAS and OpenMP (trees) pools, for the whole worker


def _is_classifier(model) -> bool:
    from sklearn.base import is_classifier

    return is_classifier(model)


def _check_supported(model) -> None:
    """What kiln can compare output for output: classifiers with integer classes and probabilities, and
    regressors. Anything else is refused up front with the reason."""
    from sklearn.base import is_regressor

    name = type(model).__name__
    if _is_classifier(model):
        if not hasattr(model, "predict_proba"):
            raise ModelError(f"sklearn {name}: the classifier has no predict_proba; kiln exports label and "
                             "probabilities (use a classifier that gives probabilities)")
        classes = np.asarray(getattr(model, "classes_", []))
        if classes.dtype.kind not in "iu":
            raise ModelError(f"sklearn {name}: class labels of dtype {classes.dtype} are not supported; "
                             "kiln exports integer class labels (encode them as integers)")
    elif not is_regressor(model):
        raise ModelError(f"sklearn {name}: neither a classifier nor a regressor; kiln converts those two kinds")
    if not hasattr(model, "n_features_in_"):
        raise ModelError(f"sklearn {name}: the model is not fitted (no n_features_in_)")


def load(model_dir: Path, options: dict | None = None):
    import mlflow.sklearn

    try:
        # Reads the skops trusted types the model was logged with from its MLmodel file.
        model = mlflow.sklearn.load_model(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - a model that does not load is the user's input problem
        raise ModelError(f"mlflow.sklearn.load_model failed: {type(exc).__name__}: {first_line(exc, 250)}") from None
    _check_supported(model)
    return model


def model_inputs(model_dir: Path, options: dict | None = None) -> list[dict]:
    """One 2-D tensor of n_features_in_ columns: a scikit-learn model takes one X. float64 is what
    scikit-learn computes in when no signature says otherwise."""
    model = load(model_dir, options)
    return [{"name": "input", "dtype": "float64", "shape": [-1, int(model.n_features_in_)]}]


def _features(spec: ModelSpec, feeds: dict[str, np.ndarray]) -> np.ndarray:
    if len(spec.inputs) != 1:
        raise ModelError(f"inputs: a scikit-learn model takes one 2-D input, the spec has {len(spec.inputs)} "
                         f"({', '.join(t.name for t in spec.inputs)})")
    return feeds[spec.inputs[0].name]


def predict(model, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs in export order, in the dtypes and shapes the ONNX graph gives them: classifiers
    [label int64 (n,), probabilities float32 (n, classes)], regressors [prediction float32 (n, targets)]."""
    x = _features(spec, feeds)
    if _is_classifier(model):
        return [np.asarray(model.predict(x)).astype(np.int64), np.asarray(model.predict_proba(x)).astype(np.float32)]
    prediction = np.asarray(model.predict(x))
    return [prediction.reshape(prediction.shape[0], -1).astype(np.float32)]


def runner(model, spec: ModelSpec, feeds: dict[str, np.ndarray]):
    """One timed call: what the ONNX graph computes in one run (label and probabilities, or the prediction)."""
    x = _features(spec, feeds)
    if _is_classifier(model):
        return lambda: (model.predict(x), model.predict_proba(x))
    return lambda: model.predict(x)


def output_names(model, spec: ModelSpec) -> list[str]:
    """The spec's names when they name every output; a signature naming only predict's output names the
    label; else skl2onnx's own names."""
    defaults = CLASSIFIER_OUTPUTS if _is_classifier(model) else REGRESSOR_OUTPUTS
    given = spec.outputs or []
    if len(given) == len(defaults):
        return list(given)
    if len(given) == 1 and len(defaults) == 2:
        return [given[0], "probabilities" if given[0] != "probabilities" else "probabilities_1"]
    return list(defaults)


def _convert(model, name: str, opset: int):
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    options = {id(model): {"zipmap": False}} if _is_classifier(model) else None
    try:
        return convert_sklearn(model, initial_types=[(name, FloatTensorType([None, int(model.n_features_in_)]))],
                               options=options, target_opset=opset)
    except Exception as exc:  # noqa: BLE001 - an estimator skl2onnx cannot convert is the model's limit
        raise ModelError(f"export: skl2onnx cannot convert {_describe(model)}: {type(exc).__name__}: "
                         f"{first_line(exc, 200)}") from None


def _describe(model) -> str:
    steps = getattr(model, "steps", None)
    if steps:
        return f"Pipeline({', '.join(type(step).__name__ for _, step in steps)})"
    return type(model).__name__


def _cast_input(proto, name: str, dtype: str) -> None:
    """Make the graph's float32 input `name` take `dtype` (the signature's) through a Cast in front."""
    import onnx
    from onnx import helper

    if np.dtype(dtype) == np.float32:
        return
    inner = f"{name}_float32"
    rename_tensor(proto.graph, name, inner)
    (graph_input,) = [i for i in proto.graph.input if i.name == name]
    graph_input.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    cast = helper.make_node("Cast", [name], [inner], to=onnx.TensorProto.FLOAT, name=f"{name}_cast")
    proto.graph.node.insert(0, cast)


def _name_outputs(proto, names: list[str]) -> None:
    """Rename the converted graph's outputs by position (through unique temporaries, so swaps cannot clash)."""
    current = [o.name for o in proto.graph.output]
    if len(current) != len(names):
        raise ModelError(f"outputs: {len(names)} names given but skl2onnx's graph has {len(current)} outputs "
                         f"({', '.join(current)})")
    for index, old in enumerate(current):
        rename_tensor(proto.graph, old, f"kiln_output_{index}")
    for index, new in enumerate(names):
        rename_tensor(proto.graph, f"kiln_output_{index}", new)


def export_onnx(model, spec: ModelSpec, feeds, output_names: list[str], exporter: str, opset: int, path: Path) -> dict:
    import onnx

    tensor = spec.inputs[0]
    _features(spec, feeds)
    proto = _convert(model, tensor.name, opset)
    _cast_input(proto, tensor.name, tensor.dtype)
    _name_outputs(proto, output_names)
    onnx.save(proto, str(path))
    import skl2onnx

    return {"exporter": "skl2onnx", "exporter_version": skl2onnx.__version__, "opset": opset,
            "estimator": _describe(model), "input_dtype": tensor.dtype, "compute_dtype": "float32"}


def layer_outputs(model, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """No layers: a pipeline's steps have no counterpart tensors that skl2onnx names, so no per-layer
    comparison."""
    return []
