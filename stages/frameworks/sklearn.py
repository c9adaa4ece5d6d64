"""scikit-learn models from MLflow's sklearn flavor (estimators and pipelines): load, run with scikit-learn
itself, export with skl2onnx.

Classifiers export two outputs, the label and the class probabilities as one tensor (ZipMap off, so every
runtime and server reads a plain tensor); regressors export their prediction. The ONNX input keeps the dtype the
model's signature declares (MLflow's `infer_signature` on numpy data says float64). A float64 input is computed
in float64, as scikit-learn computes, except inside tree ensembles, which get float32 as scikit-learn's trees cast
X to float32; float outputs are float64 then. Any other input dtype is cast to float32 in front of the graph.
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

    name = _describe(model)
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
    [label int64 (n,), probabilities (n, classes)], regressors [prediction (n, targets)], float outputs in
    float64 when the input is float64 (scikit-learn's own precision), else float32."""
    x = _features(spec, feeds)
    dtype = compute_dtype(spec)
    if _is_classifier(model):
        return [np.asarray(model.predict(x)).astype(np.int64), np.asarray(model.predict_proba(x)).astype(dtype)]
    prediction = np.asarray(model.predict(x))
    return [prediction.reshape(prediction.shape[0], -1).astype(dtype)]


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


def compute_dtype(spec: ModelSpec) -> np.dtype:
    """float64 when the input is (as scikit-learn computes), else float32: the dtype of the float outputs."""
    return np.dtype(np.float64) if np.dtype(spec.inputs[0].dtype) == np.float64 else np.dtype(np.float32)


def _convert(model, name: str, taken: np.dtype, opset: int):
    """skl2onnx's graph of the model taking `taken` (float64 or float32) columns."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    kind = DoubleTensorType if taken == np.float64 else FloatTensorType
    options = {id(model): {"zipmap": False}} if _is_classifier(model) else None
    return convert_sklearn(model, initial_types=[(name, kind([None, int(model.n_features_in_)]))],
                           options=options, target_opset=opset)


def _reason(exc: BaseException) -> str:
    """The root cause's first line: skl2onnx wraps a failing node's error in one that dumps its attributes."""
    cause = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    return f"{type(cause).__name__}: {first_line(cause, 200)}"


def _runnable_graph(model, spec: ModelSpec, output_names: list[str], opset: int):
    """The finished graph (tree ensembles at float32, the signature's input dtype, float outputs in the compute
    dtype, the outputs named) and the dtype it computes in: float64 where skl2onnx converts and ONNX Runtime
    runs every step in float64 (not all have float64 kernels, e.g. the Imputer), else float32."""
    import onnxruntime

    tensor, dtype = spec.inputs[0], compute_dtype(spec)
    failures = []
    for taken in dict.fromkeys([dtype, np.dtype(np.float32)]):
        try:
            proto = _convert(model, tensor.name, taken, opset)
            trees = _trees_at_float32(proto.graph) if taken == np.float64 else 0
            _cast_input(proto.graph, tensor.name, tensor.dtype, taken)
            _cast_outputs(proto.graph, dtype)
            _name_outputs(proto.graph, output_names)
            onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            return proto, taken, trees
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - this precision does not convert or run; the next is tried
            failures.append((taken.name, _reason(exc)))
    reasons = {reason for _, reason in failures}
    said = reasons.pop() if len(reasons) == 1 else "; ".join(f"{kind}: {reason}" for kind, reason in failures)
    raise ModelError(f"export: skl2onnx cannot convert {_describe(model)}: {said}")


def _describe(model) -> str:
    steps = getattr(model, "steps", None)
    if steps:
        return f"Pipeline({', '.join(type(step).__name__ for _, step in steps)})"
    return type(model).__name__


def _cast(name: str, output: str, dtype: np.dtype):
    from onnx import helper

    return helper.make_node("Cast", [name], [output], to=helper.np_dtype_to_tensor_dtype(dtype),
                            name=f"kiln_cast_{output}")


TREE_OPS = {"TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"}


def _trees_at_float32(graph) -> int:
    """Feed every tree ensemble float32 and give its scores back as float64, as scikit-learn does (its trees cast
    X to float32; what comes before and after stays float64). skl2onnx's float64 graph compares float64 values
    with float32 thresholds, which flips splits (measured: a random forest's votes on wine), and declares
    float64 scores that its TreeEnsembleClassifier gives as float32 (a gradient boosting graph ORT refuses)."""
    nodes, count = [], 0
    for node in graph.node:
        if node.domain != "ai.onnx.ml" or node.op_type not in TREE_OPS:
            nodes.append(node)
            continue
        count += 1
        x = node.input[0]
        node.input[0] = f"{x}_float32_for_{node.name}"
        scores = 1 if node.op_type == "TreeEnsembleClassifier" else 0
        out = node.output[scores]
        node.output[scores] = f"{out}_float32"
        nodes += [_cast(x, node.input[0], np.dtype(np.float32)), node,
                  _cast(node.output[scores], out, np.dtype(np.float64))]
    del graph.node[:]
    graph.node.extend(nodes)
    produced_double = {n.output[0] for n in nodes if n.name.startswith("kiln_cast_") and n.output[0] in
                       {o.name for o in graph.output}}
    for output in graph.output:
        if output.name in produced_double:
            output.type.tensor_type.elem_type = 11  # DOUBLE: what the Cast now gives
    return count


def _cast_input(graph, name: str, dtype: str, taken: np.dtype) -> None:
    """Make the graph's input `name` take `dtype` (the signature's) through a Cast in front when the converted
    graph takes another."""
    from onnx import helper

    if np.dtype(dtype) == taken:
        return
    inner = f"{name}_{taken.name}"
    rename_tensor(graph, name, inner)
    (graph_input,) = [i for i in graph.input if i.name == name]
    graph_input.type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph.node.insert(0, _cast(name, inner, taken))


def _cast_outputs(graph, dtype: np.dtype) -> None:
    """Float outputs in `dtype`, whatever precision the converter computed them in."""
    from onnx import helper

    want = helper.np_dtype_to_tensor_dtype(dtype)
    for output in graph.output:
        if output.type.tensor_type.elem_type in (1, 11) and output.type.tensor_type.elem_type != want:
            name, inner = output.name, f"{output.name}_computed"
            rename_tensor(graph, name, inner)
            output.name = name  # rename_tensor renamed the graph output too; the Cast gives it now
            graph.node.append(_cast(inner, name, dtype))
            output.type.tensor_type.elem_type = want


def _name_outputs(graph, names: list[str]) -> None:
    """Rename the converted graph's outputs by position (through unique temporaries, so swaps cannot clash)."""
    current = [o.name for o in graph.output]
    if len(current) != len(names):
        raise ModelError(f"outputs: {len(names)} names given but skl2onnx's graph has {len(current)} outputs "
                         f"({', '.join(current)})")
    for index, old in enumerate(current):
        rename_tensor(graph, old, f"kiln_output_{index}")
    for index, new in enumerate(names):
        rename_tensor(graph, f"kiln_output_{index}", new)


def export_onnx(model, spec: ModelSpec, feeds, output_names: list[str], exporter: str, opset: int, path: Path) -> dict:
    import onnx
    import skl2onnx

    _features(spec, feeds)
    proto, taken, trees = _runnable_graph(model, spec, output_names, opset)
    onnx.save(proto, str(path))
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return {"exporter": "skl2onnx", "exporter_version": skl2onnx.__version__, "opset": opsets.get("ai.onnx", opset),
            "opsets": opsets, "estimator": _describe(model), "input_dtype": spec.inputs[0].dtype,
            "compute_dtype": taken.name, "tree_ensembles_at_float32": trees}


def layer_outputs(model, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """No layers: a pipeline's steps have no counterpart tensors that skl2onnx names, so no per-layer
    comparison."""
    return []
