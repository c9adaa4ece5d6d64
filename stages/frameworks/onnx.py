"""ONNX models from MLflow's onnx flavor: the original is the logged graph itself, unmodified, under ONNX Runtime
with every graph optimization disabled on the CPU; "export" writes that graph as one self-contained file, and the
optimize, quantize, tune and validate steps then work on it as on any exported graph, validated against itself.

External data (MLflow's default: `mlflow.onnx.log_model(..., save_as_external_data=True)` writes the initializers
of 1 KiB and more to one `<uuid>.data` file beside `model.onnx`) is read from the model's folder only: a `location` that
is absolute or leads out of the folder (`../`) is refused before anything opens it. The exported graph has its
external data inlined, unless the model is larger than kiln's external-data threshold (stages/artifacts.py,
about 2 GiB): then its initializers go to one `model.onnx.data` beside it, as for every large model kiln writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

from pipeline.errors import ModelError, first_line
from pipeline.versions import onnxruntime_distribution
from stages.artifacts import data_file, save_onnx
from stages.frameworks import rename_tensor
from stages.tensors import ModelSpec

TOOLS = ["onnx", onnxruntime_distribution()]
_THREADS: int | None = None


class OnnxModel:
    """The logged graph: its file, and an ONNX Runtime session on it with optimizations disabled."""

    def __init__(self, model_dir: Path, path: Path, session):
        self.model_dir = model_dir
        self.path = path
        self.session = session
        self.graph_outputs = [o.name for o in session.get_outputs()]

    def output_names(self, spec: ModelSpec) -> list[str]:
        """The graph outputs the spec asks for, in its order; all of them (graph order) when it names none or
        renames them by position."""
        wanted = list(spec.outputs or [])
        if not wanted or len(wanted) == len(self.graph_outputs) and not set(wanted) <= set(self.graph_outputs):
            return list(self.graph_outputs)
        unknown = [n for n in wanted if n not in self.graph_outputs]
        if unknown:
            raise ModelError(f"outputs: {unknown[0]!r} is not an output of the ONNX graph (outputs: "
                             f"{', '.join(self.graph_outputs)})")
        return wanted


def set_threads(threads: int) -> None:
    global _THREADS
    _THREADS = threads


def model_file(model_dir: Path) -> Path:
    """The .onnx file the MLmodel's onnx flavor names (`data`)."""
    try:
        flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["onnx"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise ModelError("MLmodel has no onnx flavor") from None
    data = str(flavor.get("data") or "model.onnx")
    path = model_dir / data
    if not _inside(path, model_dir) or not path.is_file():
        raise ModelError(f"onnx flavor: data '{data}' is not a file in the model's folder")
    return path


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _graph_tensors(graph):
    """Every TensorProto a graph holds: initializers, sparse initializers, attribute tensors, and those of subgraphs."""
    for tensor in graph.initializer:
        yield tensor
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def _check_external_data(proto, path: Path, model_dir: Path) -> int:
    """Refuse external-data locations outside the model's folder (absolute, `../`, a link out); returns the
    bytes held externally. ONNX Runtime resolves locations against the .onnx file's folder."""
    from onnx import TensorProto

    external = 0
    for tensor in _graph_tensors(proto.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = path.parent / location
        if not location or os.path.isabs(location) or Path(location).drive or not _inside(target, model_dir):
            raise ModelError(f"tensor '{tensor.name}': external data location '{location}' is outside the model's "
                             "folder; kiln reads external data only from files inside it")
        if not target.is_file():
            raise ModelError(f"tensor '{tensor.name}': external data file '{location}' is missing from the model")
        external += int(info.get("length") or 0) or target.stat().st_size
    return external


def _graph(model_dir: Path):
    """The logged graph without its external data, checked; and its path."""
    import onnx

    path = model_file(model_dir)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the model's problem
        raise ModelError(f"{path.name}: not a readable ONNX model ({first_line(exc, 200)})") from None
    _check_external_data(proto, path, model_dir)
    return proto, path


def load(model_dir: Path, options: dict | None = None) -> OnnxModel:
    import onnxruntime as ort

    _, path = _graph(model_dir)
    settings = ort.SessionOptions()
    settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph exactly as logged
    settings.intra_op_num_threads = _THREADS or os.cpu_count() or 1
    settings.inter_op_num_threads = 1
    settings.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path.name}: ONNX Runtime cannot load it: {first_line(exc, 250)}") from None
    return OnnxModel(model_dir, path, session)


def _dims(value) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim]


def _tensor_values(values, what: str) -> list[dict]:
    from onnx import helper

    found = []
    for value in values:
        if not value.type.HasField("tensor_type"):
            raise ModelError(f"graph {what} '{value.name}' is not a tensor; kiln converts tensor models only")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name
        found.append({"name": value.name, "dtype": dtype, "shape": _dims(value)})
    return found


def model_inputs(model_dir: Path, options: dict | None = None) -> list[dict]:
    """The graph's inputs (not the initializers that graphs of IR < 4 also list as inputs)."""
    proto, _ = _graph(model_dir)
    constants = {t.name for t in proto.graph.initializer}
    return _tensor_values([v for v in proto.graph.input if v.name not in constants], "input")


def model_outputs(model_dir: Path, options: dict | None = None) -> list[str]:
    proto, _ = _graph(model_dir)
    return [t["name"] for t in _tensor_values(proto.graph.output, "output")]


def _feeds(model: OnnxModel, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from stages import onnx_runtime

    names = {t.name for t in spec.inputs}
    return onnx_runtime.feeds_for(model.session, {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in names})


def predict(model: OnnxModel, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return model.session.run(model.output_names(spec), _feeds(model, spec, feeds))


def runner(model: OnnxModel, spec: ModelSpec, feeds: dict[str, np.ndarray]):
    names, ready = model.output_names(spec), _feeds(model, spec, feeds)
    return lambda: model.session.run(names, ready)


def export_onnx(model: OnnxModel, spec: ModelSpec, feeds, output_names: list[str], exporter: str, opset: int,
                path: Path) -> dict:
    """The logged graph with its outputs named and ordered as output_names, its external data (from whatever
    files the model used) inlined, or in kiln's one data file beside model.onnx when the model is larger than
    the external-data threshold. The graph keeps its own opsets: converting a graph someone already exported is
    a change kiln does not make unasked, so `export.opset` does not apply to ONNX sources (recorded as
    `opset_requested`)."""
    import onnx

    external = _check_external_data(onnx.load(str(model.path), load_external_data=False), model.path, model.model_dir)
    proto = onnx.load(str(model.path))  # loads external data from the model's folder into the tensors
    _select_outputs(proto, model.output_names(spec), output_names)
    save_onnx(proto, path)
    kept = data_file(path).exists()
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return {"exporter": "onnx", "opset": opsets.get("ai.onnx"), "opset_requested": opset, "opsets": opsets,
            "external_data_inlined_bytes": 0 if kept else external, "external_data_kept_bytes": external if kept else 0,
            "producer": proto.producer_name or None}


def _select_outputs(proto, chosen: list[str], names: list[str]) -> None:
    """Keep the graph outputs chosen (in that order) and give them the export's names."""
    if len(chosen) != len(names):
        raise ModelError(f"outputs: {len(names)} names given but the ONNX graph has {len(chosen)} outputs")
    by_name = {o.name: o for o in proto.graph.output}
    kept = [by_name[n] for n in chosen]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    taken = {n for node in proto.graph.node for n in (*node.input, *node.output)}
    taken |= {v.name for v in proto.graph.input} | {t.name for t in proto.graph.initializer}
    for old, new in zip(chosen, names):
        if old != new:
            if new in taken:
                raise ModelError(f"outputs: '{new}' already names another tensor of the ONNX graph; choose another name")
            rename_tensor(proto.graph, old, new)
            taken.add(new)


def layer_outputs(model: OnnxModel, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[tuple[str, str, np.ndarray]]:
    """None: the original and the exported graph are the same graph, so there is no framework boundary to
    localize a mismatch across (precision variants are still compared tensor by tensor by localize)."""
    return []
