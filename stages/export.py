"""export: the source model to ONNX with its framework's exporter, then proven: onnx.checker, shape inference,
named dynamic axes on the graph's inputs and outputs, and a run at two different sizes of every dynamic axis."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import ConfigDict, Field, create_model

from pipeline import progress
from pipeline.errors import ModelError, RecipeError, first_line
from pipeline.schema import StageConfig, Strict
from pipeline.versions import onnxruntime_distribution
from stages import artifacts, frameworks
from stages.tensors import ModelSpec, axis_sizes, resize_axes

VERSION = 5


def _framework_fields() -> dict[str, tuple]:
    """Every framework's export options as fields of one section; a name two frameworks define is a clash."""
    fields: dict[str, tuple] = {}
    for flavor, options in frameworks.export_options().items():
        for name, info in options.model_fields.items():
            if name in fields:
                raise RecipeError(f"export.{name}: defined by two frameworks' ExportOptions; rename one")
            fields[name] = (info.annotation, info)
    return fields


FRAMEWORK_FIELDS = _framework_fields()


class Options(create_model("FrameworkExportOptions", __base__=Strict, **FRAMEWORK_FIELDS)):
    """The recipe's `export` section: the ONNX opset, plus each framework's own options (e.g. PyTorch's exporter)."""

    model_config = ConfigDict(title="Export")
    opset: int = Field(18, ge=7, le=23)


class Config(Options, StageConfig):
    source_options: dict[str, str] = Field(default_factory=dict, description="How the original model is loaded")

    model_config = ConfigDict(title="ExportConfig")


INPUTS = {"model": artifacts.SOURCE, "data": artifacts.SAMPLES}
OUTPUT = artifacts.ONNX


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return ["onnx", onnxruntime_distribution(), *frameworks.tools(frameworks.flavor_of(inputs))]


def _other_sizes(sizes: dict[str, int]) -> dict[str, int]:
    """A second size for every dynamic axis, different from the first and no larger (positional tables)."""
    return {name: (size // 2 if size > 1 else 2) for name, size in sizes.items()}


def _name_input_dims(model, spec: ModelSpec) -> None:
    """Give the graph inputs the recipe's axis names (exporters say s0, unk__3, ...)."""
    by_name = {node.name: node for node in model.graph.input}
    for tensor in spec.inputs:
        node = by_name.get(tensor.name)
        if node is None:
            raise ModelError(
                f"export: the ONNX graph has no input '{tensor.name}' (inputs: {', '.join(by_name)})"
            )
        dims = node.type.tensor_type.shape.dim
        if len(dims) != len(tensor.shape):
            raise ModelError(f"export: ONNX input '{tensor.name}' has rank {len(dims)}, the spec says {len(tensor.shape)}")
        for axis, name in tensor.dynamic_axes().items():
            dims[axis].dim_param = name


def _name_output_dims(model, observed: list[tuple[dict[str, int], list[tuple[int, ...]]]]) -> dict[str, str]:
    """Name each symbolic output dim after the input axis whose size it followed at every size tried
    (measured, so it works whatever the exporter called it); dims that follow none get '<output>_dim<i>'."""
    renamed = {}
    for index, node in enumerate(model.graph.output):
        for axis, dim in enumerate(node.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            followed = [
                name for name in observed[0][0]
                if all(shapes[index][axis] == sizes[name] for sizes, shapes in observed)
            ]
            new = followed[0] if followed else f"{node.name}_dim{axis}"
            if dim.dim_param != new:
                renamed[f"{node.name}[{axis}]"] = f"{dim.dim_param or '?'} -> {new}"
            dim.dim_param = new
    return renamed


def _drop_stack_traces(model) -> None:
    """The dynamo exporter records each node's Python stack trace, which names the absolute path the model's
    code was loaded from (this step's input folder in the store) and the virtualenv: the same model exported
    from a store at another path, or on another worker, would get other bytes and other downstream cache keys.
    Localization reads `pkg.torch.onnx.name_scopes`, which stays."""
    for node in [*model.graph.node, *(n for function in model.functions for n in function.node)]:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def _prove_dynamic_axes(framework, model, spec: ModelSpec, feeds: dict[str, np.ndarray], output_names: list[str],
                        path: Path) -> tuple[list[dict], list[tuple[dict[str, int], list[tuple[int, ...]]]]]:
    """Prove the dynamic axes: the graph must run, and give outputs of the right size, at two sizes of each.
    Returns what was checked (sizes, max abs error) and the output shapes observed at each size."""
    from stages import onnx_runtime

    sess = onnx_runtime.session(path)
    first = axis_sizes(spec, feeds)
    checked, observed = [], []
    for sizes in (first, _other_sizes(first)):
        progress.update(f"checking the graph at axis sizes {sizes}")
        trial = resize_axes(spec, feeds, sizes)
        try:
            got = onnx_runtime.run(sess, trial)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(
                f"export: the ONNX graph does not run at axis sizes {sizes} ({first_line(exc, 200)}); "
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
        observed.append((sizes, [a.shape for a in got]))
    return checked, observed


def _output_names(framework, model, spec: ModelSpec, count: int) -> list[str]:
    """The framework's names for its outputs when it has them (e.g. a classifier's label and probabilities,
    which an MLflow signature leaves unnamed), else the spec's, else output_<i>."""
    own = getattr(framework, "output_names", None)
    if own is not None:
        return own(model, spec)
    return spec.outputs or [f"output_{i}" for i in range(count)]


def _fusion_hint(framework, model) -> dict | None:
    """The transformer fusion settings the model's framework reads from the model (e.g. its config), or None."""
    hint = getattr(framework, "fusion_hint", None)
    return hint(model) if hint is not None else None


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    import onnx

    source = artifacts.source(inputs["model"])
    flavor = source["flavor"]
    progress.update(f"loading the {flavor} model")
    framework, model = frameworks.load_source(source, artifacts.model_dir(inputs["model"]), config.source_options,
                                              context.get("allow_pickle", False))
    spec = artifacts.spec(inputs["data"])
    feeds = artifacts.inputs(inputs["data"])
    reference = framework.predict(model, spec, feeds)
    output_names = _output_names(framework, model, spec, len(reference))
    if len(output_names) != len(reference):
        raise ModelError(
            f"outputs: {len(output_names)} names ({', '.join(output_names)}) but the model returns {len(reference)} tensors"
        )

    path = artifacts.onnx_model(out)
    hint = _fusion_hint(framework, model)
    if hint is not None:
        artifacts.write_fusion_hint(out, hint)
    progress.update(f"converting to ONNX (opset {config.opset})")
    try:
        done = framework.export_onnx(model, spec, feeds, output_names, config.exporter, config.opset, path)
    except ModelError as exc:  # a model its exporter cannot convert: the one line names which model
        raise ModelError(f"{source['uri']}: {exc}") from None

    external = artifacts.settle_onnx(path)  # one data file beside model.onnx when the model is that large
    progress.update("checking the exported graph (onnx.checker, shape inference)")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"export: onnx.checker rejected the exported graph: {first_line(exc, None)}") from None
    # Graph edits need no weights: saved back, the graph keeps pointing at the data file, which stays as it is.
    graph = onnx.shape_inference.infer_shapes(artifacts.load_graph(path), strict_mode=False)
    _drop_stack_traces(graph)
    _name_input_dims(graph, spec)
    onnx.save(graph, str(path))

    checked, observed = _prove_dynamic_axes(framework, model, spec, feeds, output_names, path)
    renamed = _name_output_dims(graph, observed)
    onnx.save(graph, str(path))

    ops = Counter(node.op_type for node in graph.graph.node)
    return {
        **done,
        **({"fusion_hint": hint} if hint else {}),
        "flavor": flavor,
        "nodes": sum(ops.values()),
        "top_ops": dict(ops.most_common(8)),
        "bytes": artifacts.onnx_bytes(path),
        "external_data": artifacts.data_file(path).name if external else None,
        "outputs": output_names,
        "dynamic_axes_checked": checked,
        "renamed_output_dims": renamed,
    }


def keyed(config, inputs: dict[str, Path]) -> dict:
    """What the step's key hashes: the options of the model's own framework only, so a TensorFlow model's export is
    not keyed (or re-run) on the PyTorch exporter it never uses."""
    own = frameworks.export_options().get(artifacts.flavor(inputs["model"]))
    others = set(FRAMEWORK_FIELDS) - set(own.model_fields if own else ())
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in others}


def step_config(graph, **overrides) -> dict:
    """The recipe's export options, e.g. with another exporter for a tuning candidate."""
    return {**graph.recipe.export.model_dump(mode="json"), **overrides, "source_options": graph.source_options}


def plan(graph) -> None:
    graph.add("export", step_config(graph), {"model": "fetch", "data": "data"})
