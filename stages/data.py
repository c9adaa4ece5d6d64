"""data: the validation samples and the tensor spec every later stage works from.

Samples come from the model's MLflow input example, a .npz file, an .npz logged in the source run, text tokenized
by the model's own tokenizer, or are drawn from the spec with a seed. The spec comes from the recipe's `inputs`, else from the MLflow signature.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline import progress
from pipeline.errors import DataError, ModelError, RecipeError
from pipeline.schema import Seed, StageConfig, Strict, has_control
from stages import artifacts, frameworks
from stages.tensors import MAX_DATA_BYTES, ModelSpec, TensorSpec, check_labels, conform, read_npz

VERSION = 3
MAX_SAMPLES = 100_000
MAX_AXIS = 1_000_000
DType = Literal["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]


class TensorDecl(Strict):
    name: str
    dtype: DType = "float32"
    shape: list[int | str] = Field(description="Sizes; a string names a dynamic axis (e.g. batch, seq)")
    low: float | None = Field(None, allow_inf_nan=False, description="Synthetic data: lowest value (ints: inclusive)")
    high: float | None = Field(None, allow_inf_nan=False, description="Synthetic data: highest value (ints: exclusive)")

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int | str]) -> list[int | str]:
        for dim in shape:
            if isinstance(dim, int) and not 0 < dim <= MAX_AXIS:
                raise ValueError(f"fixed sizes must be 1 .. {MAX_AXIS}; name a dynamic axis with a string")
        return shape

    @model_validator(mode="after")
    def _range(self) -> "TensorDecl":
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        dtype = np.dtype(self.dtype)
        if dtype.kind in "iu":  # drawn from [int(low), int(high)): that range must hold a value, of this dtype
            if int(self.low if self.low is not None else 0) >= int(self.high if self.high is not None else 2):
                raise ValueError(f"low ({self.low}) .. high ({self.high}) holds no integer of {self.dtype}")
            info = np.iinfo(dtype)
            for name, value in (("low", self.low), ("high", self.high)):
                if value is not None and not info.min <= value <= info.max + 1:
                    raise ValueError(f"{name}: {value} is outside {self.dtype} ({info.min} .. {info.max})")
        return self


class Data(Strict):
    source: Literal["input_example", "npz", "run_artifact", "synthetic", "text"] = "synthetic"
    path: str | None = Field(None, description="npz: file path; run_artifact: path inside the source model's run; "
                             "text: a text file, one sample per line")
    # Left out of dumps when unset, so recipes without text keep their data keys and recipe digests (a new digest
    # would send every existing recipe's next build to a new immutable bundle folder).
    texts: list[str] | None = Field(None, min_length=1, exclude_if=lambda v: v is None,
                                    description="text: the samples (instead of a file)")
    labels: str | None = Field(None, description="Array name in the npz that holds class labels")
    samples: int = Field(32, ge=1, le=MAX_SAMPLES,
                         description="Synthetic: how many; npz/run_artifact/text: at most how many")
    seed: Seed = 0
    axes: dict[str, Annotated[int, Field(ge=1, le=MAX_AXIS)]] = Field(
        default_factory=dict, description="Synthetic: size of each named dynamic axis; "
                                          "text: tokens per sample (the sequence axis)")

    @model_validator(mode="after")
    def _path_when_needed(self) -> "Data":
        if self.source in ("npz", "run_artifact") and not self.path:
            raise ValueError(f"'path' is required when source is {self.source}")
        if self.path and has_control(self.path):
            raise ValueError("path: control characters (a newline?) in the path")
        if self.source == "run_artifact" and self.path:
            parts = PurePosixPath(self.path).parts
            if self.path.startswith("/") or "\\" in self.path or ".." in parts:
                raise ValueError(f"path: {self.path!r} must be a relative path inside the run's artifacts (no '..', "
                                 "no leading '/')")
        if self.labels and self.source not in ("npz", "run_artifact"):
            raise ValueError("'labels' needs source npz or run_artifact")
        if self.source == "text" and (self.path is None) == (self.texts is None):
            raise ValueError("source text takes either 'texts' (a list) or 'path' (a text file), one of them")
        if self.texts is not None and self.source != "text":
            raise ValueError("'texts' needs source text")
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


def _spec(config: Config, source: dict, model_dir: Path, allow_pickle: bool) -> tuple[ModelSpec, dict[str, tuple]]:
    """The tensor spec, and the synthetic-data bounds {input: (low, high)} the recipe or the model gives."""
    outputs = config.outputs
    signature = source["signature"]
    if not outputs and signature.get("outputs") and all(o.get("name") for o in signature["outputs"]):
        outputs = [o["name"] for o in signature["outputs"]]
    if not outputs:  # the signature leaves them unnamed: the names the model itself gives them, when it says
        outputs = frameworks.model_outputs(source, model_dir, config.source_options, allow_pickle) or None
    if config.inputs:
        bounds = {t.name: (t.low, t.high) for t in config.inputs}
        return ModelSpec([TensorSpec(t.name, t.dtype, t.shape) for t in config.inputs], outputs), bounds
    declared = _named_inputs(source, model_dir, config.source_options, allow_pickle)
    if not declared:
        raise ModelError(
            f"{source['uri']}: neither the MLflow signature nor the model names its tensor inputs; declare them in the "
            "recipe's 'inputs'"
        )
    tensors = []
    for t in declared:
        # -1 in a signature is a dynamic axis; the first is the batch, the others share names by position. A
        # model's framework may name its axes (e.g. a transformer's `sequence`).
        shape = [d if isinstance(d, str) else ("batch" if i == 0 else f"dim{i}") if d == -1 else int(d)
                 for i, d in enumerate(t["shape"])]
        tensors.append(TensorSpec(t["name"], np.dtype(t["dtype"]).name, shape))
    bounds = {t["name"]: (t.get("low"), t.get("high")) for t in declared}
    return ModelSpec(tensors, outputs), bounds


def _synthetic(spec: ModelSpec, data: Data, axes: dict[str, int], bounds: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Random samples of the spec; `axes` sizes the named dynamic axes, `bounds` gives (low, high) per input."""
    rng = np.random.default_rng(data.seed)
    arrays, total = {}, 0
    for i, tensor in enumerate(spec.inputs):
        shape = []
        for axis, dim in enumerate(tensor.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif axis == 0:
                shape.append(data.samples)
            elif dim in axes:
                shape.append(axes[dim])
            else:
                raise ModelError(
                    f"validation.data.axes.{dim}: size needed to draw synthetic '{tensor.name}' (axis {axis} is dynamic)"
                )
        low, high = bounds.get(tensor.name, (None, None))
        dtype = np.dtype(tensor.dtype)
        total += math.prod(shape) * max(dtype.itemsize, 8)  # drawn as 64-bit, then cast
        if total > MAX_DATA_BYTES:
            raise DataError(f"validation.data: {data.samples} synthetic samples of shape {shape[1:]} need "
                            f"{total / 2**30:.1f} GiB; lower validation.data.samples or validation.data.axes "
                            f"(at most {MAX_DATA_BYTES / 2**30:.0f} GiB)")
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


def _run_artifact_root(run_id: str, tracking_uri: str) -> Path | None:
    """The run's artifact folder when it is on this machine's disk (a file: artifact URI), else None."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    import mlflow

    uri = mlflow.MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.artifact_uri
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(url2pathname(parsed.path) if parsed.scheme else uri)
    return None


def _inside(path: Path, root: Path) -> bool:
    """path lies under root once every link on the way is followed."""
    return path.resolve().is_relative_to(root.resolve())


def _download(data: Data, source: dict, out: Path, tracking_uri: str) -> Path:
    """The run artifact `data.path`, downloaded; refused when it (or a link in it) leads out of the run's artifacts."""
    import mlflow.artifacts

    field = f"validation.data.path: '{data.path}'"
    try:
        root = _run_artifact_root(source["run_id"], tracking_uri)
        if root is not None and root.exists() and not _inside(root / data.path, root):
            raise DataError(f"{field} leads out of the artifacts of run {source['run_id']}")
        dst = out.parent / "download"
        progress.update(f"downloading run artifact {data.path}")
        path = Path(mlflow.artifacts.download_artifacts(run_id=source["run_id"], artifact_path=data.path,
                                                        dst_path=str(dst), tracking_uri=tracking_uri))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{field} not found in run {source['run_id']} ({type(exc).__name__})") from None
    if not _inside(path, dst):
        raise DataError(f"{field} leads out of the artifacts of run {source['run_id']}")
    if not path.is_file():
        raise DataError(f"{field} is a folder in run {source['run_id']}; name the .npz file in it")
    return path


def _from_file(config: Config, spec: ModelSpec, source: dict, out: Path, context: dict):
    """(arrays, labels, origin) from the recipe's .npz file or the source run's."""
    data = config.data
    if data.source == "npz":
        path = Path(context["npz"])
        origin = f"validation.data.path {path}"
    else:
        path = _download(data, source, out, context["tracking_uri"])
        origin = f"validation.data.path {data.path} (run {source['run_id']})"
    arrays = read_npz(path, origin)
    labels = None
    if data.labels:
        if data.labels not in arrays:
            raise DataError(f"validation.data.labels: no array '{data.labels}' in {path.name}")
        labels = arrays[data.labels]
    arrays = {t.name: arrays[t.name] for t in spec.inputs if t.name in arrays} or arrays
    if spec.batch_axis_named:
        arrays = {k: v[: data.samples] if v.ndim else v for k, v in arrays.items()}  # rank is checked next
    return arrays, labels, origin


def _texts(data: Data, context: dict) -> tuple[list[str], str]:
    """The validation texts (at most `samples`), and where they came from."""
    if data.texts is not None:
        return data.texts[: data.samples], "validation.data.texts"
    path = Path(context["text"])
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"validation.data.path {path}: not a readable UTF-8 text file ({exc})") from None
    texts = [line for line in lines if line]
    if not texts:
        raise DataError(f"validation.data.path {path}: no text (one sample per line)")
    return texts[: data.samples], f"validation.data.path {path}"


def _from_text(spec: ModelSpec, data: Data, axes: dict[str, int], source: dict, model_dir: Path,
               options: dict, context: dict) -> tuple[dict[str, np.ndarray], str]:
    """Text tokenized by the model's own tokenizer, padded/truncated to the sequence axis' size so samples stack."""
    texts, origin = _texts(data, context)
    sequence = next((d for t in spec.inputs for d in t.shape[1:2] if isinstance(d, str)), None)
    if sequence is None or sequence not in axes:
        raise ModelError(f"validation.data.axes: the number of tokens per text is needed (axis {sequence})")
    return frameworks.tokenize(source, model_dir, options, texts, axes[sequence],
                              context.get("allow_pickle", False)), origin


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    source = artifacts.source(inputs["model"])
    model_dir = artifacts.model_dir(inputs["model"])
    allow_pickle = context.get("allow_pickle", False)
    spec, bounds = _spec(config, source, model_dir, allow_pickle)
    data = config.data
    labels = None
    if data.source in ("synthetic", "text"):
        # The model's framework may size its own axes (a transformer's sequence); the recipe's sizes win.
        axes = {**(frameworks.default_axes(source, model_dir, config.source_options, allow_pickle) or {}), **data.axes}
    if data.source == "synthetic":
        arrays = _synthetic(spec, data, axes, bounds)
        origin = "synthetic data"
    elif data.source == "text":
        arrays, origin = _from_text(spec, data, axes, source, model_dir, config.source_options, context)
    elif data.source == "input_example":
        arrays = _from_input_example(model_dir, spec, source)
        origin = f"input example of {source['uri']}"
    else:
        arrays, labels, origin = _from_file(config, spec, source, out, context)
    shutil.rmtree(out.parent / "download", ignore_errors=True)  # read into memory; keep only what we write
    # Checked, not coerced: a dtype the model does not take, NaN or no samples is the data's fault (exit 2).
    arrays, notes = conform(spec, arrays, origin)
    first = next(iter(arrays.values()), None)
    count = int(first.shape[0]) if first is not None and first.ndim else 1
    if labels is not None:
        labels = check_labels(labels, count, f"validation.data.labels '{data.labels}'")
    artifacts.write_samples(out, spec, arrays, labels)
    return {
        "source": data.source,
        "samples": count,
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "labels": labels is not None,
        "notes": notes,
    }


def plan(graph) -> None:
    recipe = graph.recipe
    data = recipe.validation.data.model_dump(mode="json")
    config = {"data": data,
              "inputs": [t.model_dump(mode="json") for t in recipe.inputs] if recipe.inputs else None,
              "outputs": recipe.outputs, "source_options": graph.source_options}
    files: dict[str, str] = {}
    context: dict = {"tracking_uri": graph.source.tracking_uri}
    kind = recipe.validation.data.source
    if kind == "npz" or (kind == "text" and recipe.validation.data.path):
        local = graph.resolve(recipe.validation.data.path or "")
        if not local.is_file():
            raise RecipeError(f"recipe {graph.recipe_path}: validation.data.path: no such file {local}")
        config["data"]["path"] = local.name  # the file's content is keyed (files), not where it lies
        files[kind] = context[kind] = str(local)
    graph.add("data", config, {"model": "fetch"}, files=files, context=context)
