"""Source frameworks. Each module knows how to load an MLflow model of its flavor, run it on numpy feeds, and
export it to ONNX:

    load(model_dir: Path, options: dict) -> model           options: {'signature': ...} from the recipe's source
    predict(model, spec: ModelSpec, feeds: dict[str, ndarray]) -> list[ndarray]   (outputs in export order)
    runner(model, spec, feeds) -> callable                    one timed call, for validate's latency
    export_onnx(model, spec, feeds, output_names, exporter, opset, path) -> dict (what was done)
    layer_outputs(model, spec, feeds) -> [(layer, type, ndarray)]   for validate's per-layer localization
    set_threads(n), TOOLS: list of distributions whose versions key the steps that use it
and optionally
    ExportOptions                                             pydantic model: its fields join the recipe's `export`
    model_inputs(model_dir, options) -> [{name, dtype, shape}]   the model's own inputs (-1 or a name: dynamic
                                                              axis; optional low/high: bounds of valid synthetic
                                                              values), for signatures that leave them unnamed
    default_axes(model_dir, options) -> {axis: size}          sizes of its named axes when the recipe gives none
    tokenize(model_dir, options, texts, length) -> feeds      text models: validation text as the model's tensors
    fusion_hint(model) -> {model_type, num_heads, hidden_size, from} | None   at export: the transformer fusion
                                                              the model's config implies (optimize uses it)
    model_outputs(model_dir, options) -> [name]              the model's own output names, read before the spec
    output_names(model, spec) -> [str]                        at export, from the loaded model, when the spec's
                                                              outputs (the recipe's or signature's) say too little

The key of FRAMEWORKS is the MLflow flavor it reads; their order is the order of preference when a model has
several flavors. A new source framework is a module plus an entry here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from pipeline.errors import ModelError
from stages.untrusted import require_trusted

FRAMEWORKS: dict[str, str] = {
    "pytorch": "stages.frameworks.pytorch",
    "tensorflow": "stages.frameworks.tensorflow",
    "onnx": "stages.frameworks.onnx",
    "sklearn": "stages.frameworks.sklearn",
    "transformers": "stages.frameworks.transformers",
}


def framework(flavor: str) -> ModuleType:
    try:
        return importlib.import_module(FRAMEWORKS[flavor])
    except KeyError:
        raise ModelError(
            f"model flavor '{flavor}' is not supported yet (supported: {', '.join(FRAMEWORKS)})"
        ) from None


def export_options() -> dict[str, type]:
    """Each framework's own export options (a pydantic model named ExportOptions in its module), by flavor. They
    are fields of the recipe's `export` section, and only the model's own framework's options key its export."""
    found = {}
    for flavor in FRAMEWORKS:
        model = getattr(framework(flavor), "ExportOptions", None)
        if model is not None:
            found[flavor] = model
    return found


def model_inputs(source: dict, model_dir: Path, options: dict, allow_pickle: bool = False) -> list[dict] | None:
    """The model's own input tensors ([{name, dtype, shape}], -1 for a dynamic axis) from its framework's optional
    `model_inputs(model_dir, options)`, for signatures that do not name them; None when the framework cannot say."""
    return _ask_model(source, "model_inputs", model_dir, options, allow_pickle)


def model_outputs(source: dict, model_dir: Path, options: dict, allow_pickle: bool = False) -> list[str] | None:
    """The model's own output names from its framework's optional `model_outputs(model_dir, options)`, for
    signatures that do not name them; None when the framework cannot say."""
    return _ask_model(source, "model_outputs", model_dir, options, allow_pickle)


def default_axes(source: dict, model_dir: Path, options: dict, allow_pickle: bool = False) -> dict[str, int] | None:
    """Sizes of the model's own named axes (e.g. a transformer's sequence) from its framework's optional
    `default_axes(model_dir, options)`; None when the framework has none."""
    return _ask_model(source, "default_axes", model_dir, options, allow_pickle)


def tokenize(source: dict, model_dir: Path, options: dict, texts: list[str], length: int,
             allow_pickle: bool = False) -> dict:
    """Validation text as the model's input tensors, by its framework's `tokenize`; only text models have one."""
    if not hasattr(framework(source.get("flavor") or "unknown"), "tokenize"):
        raise ModelError(f"validation.data.source text: {source['uri']} is a {source.get('flavor')} model, which "
                         "takes tensors, not text (text needs a model with a tokenizer: the transformers flavor)")
    return _ask_model(source, "tokenize", model_dir, options, allow_pickle, texts, length)


def _ask_model(source: dict, function: str, model_dir: Path, options: dict, allow_pickle: bool, *args):
    module = framework(source.get("flavor") or "unknown")
    reader = getattr(module, function, None)
    if reader is None:
        return None
    require_trusted(model_dir, source["uri"], allow_pickle)  # readers may load the model
    try:
        return reader(model_dir, options, *args)
    except ModelError as exc:
        raise ModelError(f"{source['uri']}: {exc}") from None


def tools(flavor: str | None) -> list[str]:
    if flavor is None or flavor not in FRAMEWORKS:
        return []
    return list(importlib.import_module(FRAMEWORKS[flavor]).TOOLS)


def load_source(source: dict, model_dir: Path, options: dict, allow_pickle: bool = False):
    """Load the original model described by fetch's source.json; load errors name the model URI. A model that
    would run code when loaded (stages/untrusted.py) is refused unless the step's context trusts it."""
    module = framework(source.get("flavor") or "unknown")
    require_trusted(model_dir, source["uri"], allow_pickle)
    try:
        return module, module.load(model_dir, options)
    except ModelError as exc:
        raise ModelError(f"{source['uri']}: {exc}") from None


def flavor_of(inputs: dict[str, Path]) -> str | None:
    """The source flavor fetch recorded, for steps that read the model (None before fetch has run)."""
    from stages import artifacts

    return artifacts.flavor(inputs["model"]) if "model" in inputs else None


def rename_tensor(graph, old: str, new: str) -> None:
    """Rename an ONNX tensor everywhere the graph names it (node inputs/outputs, graph outputs, value_info)."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new
