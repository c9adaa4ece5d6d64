"""export: the source model to ONNX with its framework's exporter, then proven: onnx.checker, shape inference,
named dynamic axes on the graph's inputs and outputs, and a run at two different sizes of every dynamic axis."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.errors import ModelError
from pipeline.versions import onnxruntime_distribution
from stages import frameworks
from stages.tensors import ModelSpec, axis_sizes, load_arrays, resize_axes

VERSION = 1


def _flavor(inputs: dict[str, Path]) -> str | None:
    try:
        return json.loads((inputs["model"] / "source.json").read_text())["flavor"]
    except (OSError, KeyError, ValueError):
        return None


def tools(config: dict, inputs: dict[str, Path]) -> list[str]:
    return ["onnx", onnxruntime_distribution(), *frameworks.tools(_flavor(inputs))]


def _other_sizes(sizes: dict[str, int]) -> dict[str, int]:
    """A second size for every dynamic axis, different from the first and no larger (positional tables)."""
    return {name: (size // 2 if size > 1 else 2) for name, size in sizes.items()}


def _name_dynamic_dims(model, spec: ModelSpec) -> list[str]:
    """Give graph inputs the recipe's axis names; return output dims whose names no input axis explains."""
    for tensor, node in zip(spec.inputs, model.graph.input):
        for axis, name in tensor.dynamic_axes().items():
            dim = node.type.tensor_type.shape.dim[axis]
            dim.dim_param = name
    known = {n for t in spec.inputs for n in t.dynamic_axes().values()}
    unexplained = []
    for node in model.graph.output:
        for axis, dim in enumerate(node.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and dim.dim_param not in known:
                unexplained.append(f"{node.name}[{axis}]={dim.dim_param}")
    return unexplained


def run(config: dict, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    import onnx

    from stages import onnx_runtime

    flavor = _flavor(inputs)
    framework = frameworks.framework(flavor or "unknown")
    spec = ModelSpec.load(inputs["data"] / "spec.json")
    feeds = load_arrays(inputs["data"] / "inputs.npz")
    model = framework.load(inputs["model"] / "model")
    reference = framework.predict(model, spec, feeds)
    output_names = spec.outputs or [f"output_{i}" for i in range(len(reference))]
    if len(output_names) != len(reference):
        raise ModelError(
            f"outputs: {len(output_names)} names ({', '.join(output_names)}) but the model returns {len(reference)} tensors"
        )

    path = out / "model.onnx"
    done = framework.export_onnx(model, spec, feeds, output_names, config["exporter"], config["opset"], path)

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"export: onnx.checker rejected the exported graph: {str(exc).splitlines()[0]}") from None
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=False)
    unexplained = _name_dynamic_dims(graph, spec)
    onnx.save(graph, str(path))

    # Prove the dynamic axes: the graph must run, and give outputs of the right size, at two sizes of each.
    sess = onnx_runtime.session(path)
    first = axis_sizes(spec, feeds)
    checked = []
    for sizes in (first, _other_sizes(first)):
        trial = resize_axes(spec, feeds, sizes)
        try:
            got = onnx_runtime.run(sess, trial)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(
                f"export: the ONNX graph does not run at axis sizes {sizes} ({str(exc).splitlines()[0][:200]}); "
                f"a dynamic axis was probably traced as a constant"
            ) from None
        expected = framework.predict(model, spec, trial)
        for name, a, b in zip(output_names, got, expected):
            if a.shape != b.shape:
                raise ModelError(
                    f"export: output '{name}' has shape {list(a.shape)} at axis sizes {sizes}, "
                    f"the original model gives {list(b.shape)}"
                )
        checked.append({"sizes": sizes, "max_abs_error": float(max(np.max(np.abs(a - b)) for a, b in zip(got, expected)))})

    ops = Counter(node.op_type for node in graph.graph.node)
    return {
        **done,
        "flavor": flavor,
        "nodes": sum(ops.values()),
        "top_ops": dict(ops.most_common(8)),
        "bytes": path.stat().st_size,
        "outputs": output_names,
        "dynamic_axes_checked": checked,
        "unexplained_output_dims": unexplained,
    }
