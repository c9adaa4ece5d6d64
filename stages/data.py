"""data: the validation samples and the tensor spec every later stage works from.

Samples come from the model's MLflow input example, a .npz file, an .npz logged in the source run, or are
drawn from the spec with a seed. The spec comes from the recipe's `inputs`, else from the MLflow signature.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.errors import ModelError, RecipeError
from pipeline.schema import StageConfig, Strict
from stages import artifacts, frameworks
from stages.tensors import ModelSpec, TensorSpec, check_feeds, load_arrays

VERSION = 2
DType = Literal["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]


class TensorDecl(Strict):
    name: str
    dtype: DType = "float32"
    shape: list[int | str] = Field(description="Sizes; a string names a dynamic axis (e.g. batch, seq)")
    low: float | None = Field(None, description="Synthetic data: lowest value (ints: inclusive)")
    high: float | None = Field(None, description="Synthetic data: highest value (ints: exclusive)")

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int | str]) -> list[int | str]:
        for dim in shape:
            if isinstance(dim, int) and dim <= 0:
                raise ValueError("fixed sizes must be > 0; name a dynamic axis with a string")
        return shape


class Data(Strict):
    source: Literal["input_example", "npz", "run_artifact", "synthetic"] = "synthetic"
    path: str | None = Field(None, description="npz: file path; run_artifact: path inside the source model's run")
    labels: str | None = Field(None, description="Array name in the npz that holds class labels")
    samples: int = Field(32, ge=1, description="Synthetic: how many; npz/run_artifact: at most how many")
    seed: int = 0
    axes: dict[str, int] = Field(default_factory=dict, description="Synthetic: size of each named dynamic axis")

    @model_validator(mode="after")
    def _path_when_needed(self) -> "Data":
        if self.source in ("npz", "run_artifact") and not self.path:
            raise ValueError(f"'path' is required when source is {self.source}")
        if self.labels and self.source not in ("npz", "run_artifact"):
            raise ValueError("'labels' needs source npz or run_artifact")
        return self


class Config(StageConfig):
    data: Data
    inputs: list[TensorDecl] | None = None
    outputs: list[str] | None = None
    source_options: dict[str, str] = Field(default_factory=dict, description="How the original model is loaded")


INPUTS = {"model": artifacts.SOURCE}
OUTPUT = artifacts.SAMPLES


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    # The model's framework too: a signature that leaves its inputs unnamed is completed from the model itself.
    return ["numpy", *frameworks.tools(frameworks.flavor_of(inputs))] + (
        ["mlflow"] if config.data.source in ("input_example", "run_artifact") else [])


def _named_inputs(source: dict, model_dir: Path, options: dict, allow_pickle: bool) -> list[dict] | None:
    """The signature's input tensors, named: as MLflow recorded them, or, when the signature leaves them unnamed
    (as `infer_signature` on numpy arrays does), with the names the model itself gives its inputs (its
    framework's `model_inputs`), matched by position. None when neither says."""
    declared = source["signature"].get("inputs")
    if declared and all(t.get("name") for t in declared):
        return declared
    own = frameworks.model_inputs(source, model_dir, options, allow_pickle)
    if not own:
        return None
    if not declared:
        return own
    if len(declared) != len(own):
        raise ModelError(f"{source['uri']}: the MLflow signature has {len(declared)} unnamed input(s), the model "
                         f"{len(own)} ({', '.join(t['name'] for t in own)}); declare them in the recipe's 'inputs'")
    return [{**t, "name": mine["name"], "shape": _fixed_sizes(t["shape"], mine["shape"])}
            for t, mine in zip(declared, own)]


def _fixed_sizes(declared: list[int], own: list[int]) -> list[int]:
    """The signature's shape, with the sizes the model fixes where the signature says -1: `infer_signature`
    marks every first axis -1, but a program traced at one size (torch.export on a one-row example) takes no other."""
    if len(declared) != len(own):
        return declared
    return [mine if d == -1 and mine != -1 else d for d, mine in zip(declared, own)]


def _spec(config: Config, source: dict, model_dir: Path, allow_pickle: bool) -> ModelSpec:
    outputs = config.outputs
    signature = source["signature"]
    if not outputs and signature.get("outputs") and all(o.get("name") for o in signature["outputs"]):
        outputs = [o["name"] for o in signature["outputs"]]
    if not outputs:  # the signature leaves them unnamed: the names the model itself gives them, when it says
        outputs = frameworks.model_outputs(source, model_dir, config.source_options, allow_pickle) or None
    if config.inputs:
        return ModelSpec([TensorSpec(t.name, t.dtype, t.shape) for t in config.inputs], outputs)
    declared = _named_inputs(source, model_dir, config.source_options, allow_pickle)
    if not declared:
        raise ModelError(
            f"{source['uri']}: neither the MLflow signature nor the model names its tensor inputs; declare them in the "
            "recipe's 'inputs'"
        )
    tensors = []
    for t in declared:
        # -1 in a signature is a dynamic axis; the first is the batch, the others share names by position.
        shape = [("batch" if i == 0 else f"dim{i}") if d == -1 else int(d) for i, d in enumerate(t["shape"])]
        tensors.append(TensorSpec(t["name"], np.dtype(t["dtype"]).name, shape))
    return ModelSpec(tensors, outputs)


def _synthetic(spec: ModelSpec, config: Config, declared: dict[str, TensorDecl]) -> dict[str, np.ndarray]:
    data = config.data
    rng = np.random.default_rng(data.seed)
    arrays = {}
    for i, tensor in enumerate(spec.inputs):
        shape = []
        for axis, dim in enumerate(tensor.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif axis == 0:
                shape.append(data.samples)
            elif dim in data.axes:
                shape.append(data.axes[dim])
            else:
                raise ModelError(
                    f"validation.data.axes.{dim}: size needed to draw synthetic '{tensor.name}' (axis {axis} is dynamic)"
                )
        decl = declared.get(tensor.name)
        low, high = (decl.low, decl.high) if decl else (None, None)
        dtype = np.dtype(tensor.dtype)
        if dtype.kind in "iu":
            array = rng.integers(int(low if low is not None else 0), int(high if high is not None else 2), size=shape)
        elif dtype.kind == "b":
            array = rng.integers(0, 2, size=shape).astype(bool)
        elif low is not None or high is not None:
            array = rng.uniform(low if low is not None else 0.0, high if high is not None else 1.0, size=shape)
        else:
            array = rng.standard_normal(size=shape)
        arrays[tensor.name] = array.astype(dtype)
    return arrays


def _from_input_example(model_dir: Path, spec: ModelSpec, source: dict) -> dict[str, np.ndarray]:
    from mlflow.models import Model

    if not source.get("input_example"):
        raise ModelError(f"validation.data.source input_example: {source['uri']} was logged without an input example")
    example = Model.load(str(model_dir)).load_input_example(str(model_dir))
    if isinstance(example, dict):
        return {k: np.asarray(v) for k, v in example.items()}
    if len(spec.inputs) == 1:
        return {spec.inputs[0].name: np.asarray(example)}
    raise ModelError(f"{source['uri']}: the input example is one array but the model has {len(spec.inputs)} inputs")


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    source = artifacts.source(inputs["model"])
    spec = _spec(config, source, artifacts.model_dir(inputs["model"]), context.get("allow_pickle", False))
    data = config.data
    labels = None
    if data.source == "synthetic":
        declared = {t.name: t for t in (config.inputs or [])}
        arrays = _synthetic(spec, config, declared)
        origin = "synthetic data"
    elif data.source == "input_example":
        arrays = _from_input_example(artifacts.model_dir(inputs["model"]), spec, source)
        origin = f"input example of {source['uri']}"
    else:
        if data.source == "npz":
            path = Path(context["npz"])
        else:
            import mlflow.artifacts

            try:
                path = Path(
                    mlflow.artifacts.download_artifacts(
                        run_id=source["run_id"],
                        artifact_path=data.path,
                        dst_path=str(out.parent / "download"),
                        tracking_uri=context["tracking_uri"],
                    )
                )
            except Exception as exc:  # noqa: BLE001
                raise ModelError(
                    f"validation.data.path: '{data.path}' not found in run {source['run_id']} ({type(exc).__name__})"
                ) from None
        origin = f"validation.data.path {path if data.source == 'npz' else data.path}"
        try:
            arrays = load_arrays(path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{origin}: not a readable .npz file ({exc})") from None
        if data.labels:
            if data.labels not in arrays:
                raise ModelError(f"validation.data.labels: no array '{data.labels}' in {path.name}")
            labels = arrays[data.labels]
        arrays = {t.name: arrays[t.name] for t in spec.inputs if t.name in arrays} or arrays
        if spec.batch_axis_named:
            arrays = {k: v[: data.samples] for k, v in arrays.items()}
            labels = labels[: data.samples] if labels is not None else None
    shutil.rmtree(out.parent / "download", ignore_errors=True)  # read into memory; keep only what we write
    check_feeds(spec, arrays, origin)
    arrays = {t.name: arrays[t.name].astype(np.dtype(t.dtype), copy=False) for t in spec.inputs}
    artifacts.write_samples(out, spec, arrays, labels)
    return {
        "source": data.source,
        "samples": int(next(iter(arrays.values())).shape[0]) if arrays else 0,
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "labels": labels is not None,
    }


def plan(graph) -> None:
    recipe = graph.recipe
    config = {"data": recipe.validation.data.model_dump(mode="json"),
              "inputs": [t.model_dump(mode="json") for t in recipe.inputs] if recipe.inputs else None,
              "outputs": recipe.outputs, "source_options": graph.source_options}
    files: dict[str, str] = {}
    context: dict = {"tracking_uri": graph.source.tracking_uri}
    if recipe.validation.data.source == "npz":
        npz = graph.resolve(recipe.validation.data.path or "")
        if not npz.is_file():
            raise RecipeError(f"recipe {graph.recipe_path}: validation.data.path: no such file {npz}")
        config["data"]["path"] = npz.name  # the file's content is keyed (files), not where it lies
        files["npz"] = context["npz"] = str(npz)
    graph.add("data", config, {"model": "fetch"}, files=files, context=context)
