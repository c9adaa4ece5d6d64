"""Per-layer mismatch localization across the framework boundary.

The original model's layer outputs (PyTorch forward hooks, Keras layer outputs) are matched to tensors of the
exported ONNX graph through the module/layer names the exporters carry into node names and metadata
(TorchScript: `/features/features.0/Conv`; dynamo: `pkg.torch.onnx.name_scopes`; tf2onnx: `model/dense/MatMul`).
Each matched layer gets its error figures; the first layer whose relative error exceeds the tolerance is the
first divergent one. The same code compares two ONNX graphs tensor by tensor (e.g. FP32 vs a quantized variant).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np

from pipeline import progress
from stages import artifacts

RELATIVE_TOLERANCE = 1e-3  # max |a - b| / max |reference| above this is a divergence


def _scopes(node) -> set[str]:
    """Module/layer names a node belongs to, whichever exporter wrote it."""
    found: set[str] = set()
    meta = {p.key: p.value for p in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            found.update(s for s in ast.literal_eval(meta["pkg.torch.onnx.name_scopes"]) if s)
        except (ValueError, SyntaxError):
            pass
    parts = [p for p in node.name.split("/")[:-1] if p]
    found.update(parts)
    found.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return found


def with_all_outputs(model):
    """A copy of the graph that also returns every intermediate tensor with a known type."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    typed = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    existing = {o.name for o in inferred.graph.output}
    for node in inferred.graph.node:
        for name in node.output:
            if name and name not in existing and name in typed:
                inferred.graph.output.append(typed[name])
                existing.add(name)
    return inferred


def onnx_tensors(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of the ONNX model at `path` on these feeds. The graph is expanded without its weights and
    handed to ONNX Runtime in memory, which reads any external data from the model's folder."""
    import onnxruntime as ort

    from stages import onnx_runtime

    expanded = with_all_outputs(artifacts.load_graph(path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    options.log_severity_level = 3
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    sess = ort.InferenceSession(expanded.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, onnx_runtime.feeds_for(sess, feeds))))


def error_figures(reference: np.ndarray, candidate: np.ndarray) -> dict:
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    diff = np.abs(cand - ref)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    if np.isnan(diff).any():
        max_abs = float("inf")
    return {
        "max_abs_error": max_abs,
        "mean_abs_error": float(np.nanmean(diff)) if diff.size else 0.0,
        "relative_error": max_abs / scale if scale > 0 else max_abs,
    }


def first_divergent(layers: list[dict], tolerance: float = RELATIVE_TOLERANCE) -> dict | None:
    for layer in layers:
        if layer["relative_error"] > tolerance:
            return layer
    return None


def _fuzzy_scope(layer: str, scopes: set[str]) -> str | None:
    """Keras 3 traced under tf2onnx uniquifies scope names (dense -> dense_1, dense_1 -> dense_1_2)."""
    pattern = re.compile(re.escape(layer) + r"_\d+$")
    return next((s for s in sorted(scopes) if pattern.match(s)), None)


def match_layers(model, layer_outputs: list[tuple[str, str, np.ndarray]], tensors: dict[str, np.ndarray]) -> list[dict]:
    """For each original layer (in execution order), the ONNX tensor computed last inside that layer's scope
    with the layer output's shape, and the error between them."""
    order = []
    for node in model.graph.node:
        scopes = _scopes(node)
        order += [(name, scopes, node.name) for name in node.output if name in tensors]
    layers = []
    fuzzy_from = 0  # uniquified names are matched in execution order, so dense cannot claim dense_1's nodes
    claimed: set[str] = set()  # a scope belongs to one layer: Keras' dense_1 is not layer dense's dense_1
    for layer, kind, reference in layer_outputs:
        scope = layer if layer not in claimed else None
        candidates = [(i, name, node) for i, (name, scopes, node) in enumerate(order) if scope in scopes]
        if not candidates:
            for i in range(fuzzy_from, len(order)):
                scope = _fuzzy_scope(layer, order[i][1] - claimed)
                if scope:
                    candidates = [(j, name, node) for j, (name, scopes, node) in enumerate(order) if scope in scopes]
                    break
        claimed.add(scope)
        candidates = [c for c in candidates if tensors[c[1]].shape == reference.shape]
        if not candidates:
            continue
        index, tensor, node = candidates[-1]
        fuzzy_from = max(fuzzy_from, index + 1)
        layers.append({"layer": layer, "type": kind, "onnx_tensor": tensor, "onnx_node": node,
                       "shape": list(reference.shape), **error_figures(reference, tensors[tensor])})
    return layers


def localize(framework, model, spec, feeds: dict[str, np.ndarray], onnx_path: Path,
             tolerance: float = RELATIVE_TOLERANCE) -> dict:
    """Layer-by-layer comparison of the original model and an ONNX graph on the same inputs."""
    if not hasattr(framework, "layer_outputs"):
        return {"available": False, "reason": "this framework does not expose layer outputs"}
    progress.update("localize: capturing the original model's layer outputs")
    layer_outputs = framework.layer_outputs(model, spec, feeds)
    if not layer_outputs:
        return {"available": False, "reason": "the model exposes no layer outputs (e.g. a SavedModel signature)"}
    progress.update(f"localize: running the ONNX graph with all {len(layer_outputs)} layer outputs exposed")
    graph = artifacts.load_graph(onnx_path)
    layers = match_layers(graph, layer_outputs, onnx_tensors(onnx_path, feeds))
    first = first_divergent(layers, tolerance)
    return {
        "available": True,
        "tolerance": tolerance,
        "layers_in_model": len(layer_outputs),
        "layers_matched": len(layers),
        "first_divergent": first,
        "layers": layers,
    }


def compare_onnx(reference_path: Path, candidate_path: Path, feeds: dict[str, np.ndarray],
                 tolerance: float = RELATIVE_TOLERANCE) -> dict:
    """Tensor-by-tensor comparison of two ONNX graphs that share tensor names (e.g. FP32 vs a variant)."""
    progress.update("localize: running both graphs with every tensor exposed")
    reference_model = artifacts.load_graph(reference_path)
    reference = onnx_tensors(reference_path, feeds)
    candidate = onnx_tensors(candidate_path, feeds)
    layers = []
    for node in reference_model.graph.node:
        for name in node.output:
            if name in reference and name in candidate and reference[name].shape == candidate[name].shape \
                    and np.issubdtype(reference[name].dtype, np.floating):
                layers.append({"layer": node.name or name, "type": node.op_type, "onnx_tensor": name,
                               "shape": list(reference[name].shape),
                               **error_figures(reference[name], candidate[name])})
    return {"available": True, "tolerance": tolerance, "layers_matched": len(layers),
            "first_divergent": first_divergent(layers, tolerance), "layers": layers}
