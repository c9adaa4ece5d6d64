"""The recipe: one YAML file per model, declared as pydantic models. Unknown keys are errors.

`kiln schema` prints the JSON Schema of `Recipe`; `kiln validate` reports every problem with its field path.
Relative paths inside a recipe are resolved against the recipe file's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import RecipeError
from pipeline.hardware import BUILTIN, TargetProfile

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>[0-9]+|latest))$")
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
DType = Literal["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.\-]*$", max_length=100)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(Strict):
    uri: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; overrides MLFLOW_TRACKING_URI")
    signature: str = Field("serving_default", description="TensorFlow SavedModels: the signature to convert and call")

    @field_validator("uri")
    @classmethod
    def _model_uri(cls, value: str) -> str:
        if not MODEL_URI.match(value):
            raise ValueError(f"{value!r} is not models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest")
        return value


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


class Export(Strict):
    exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo", description="torch.onnx exporter; torchscript gives the attention fusions on BERT-like models"
    )
    opset: int = Field(18, ge=7, le=23)


class TransformerFusion(Strict):
    model_type: Literal["bert", "bart", "gpt2", "t5", "vit", "clip"] = "bert"
    num_heads: int = Field(0, ge=0, description="0 = let onnxruntime detect")
    hidden_size: int = Field(0, ge=0, description="0 = let onnxruntime detect")


class Optimize(Strict):
    level: Literal["disabled", "basic", "extended", "all"] = Field(
        "extended", description="ONNX Runtime offline graph optimization level ('all' adds CPU-layout-specific ops)"
    )
    transformer: TransformerFusion | None = Field(None, description="onnxruntime.transformers fusions")


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


class Latency(Strict):
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1], min_length=1)
    warmup: int = Field(10, ge=1)
    iterations: int = Field(100, ge=100, description="Timed runs per batch size and runtime (>= 100)")
    threads: int | None = Field(None, ge=1, description="Intra-op threads for both runtimes; default: all cores")
    target_ci: float | None = Field(
        0.05, gt=0, description="Keep measuring until each p50's 95 % CI half-width is within this fraction of it"
    )
    max_iterations: int = Field(2000, ge=100, description="Cap on timed runs per runtime and batch size")
    time_budget_s: float = Field(10.0, gt=0, description="Cap on extra measuring time per batch size")


class Localize(Strict):
    enabled: bool = Field(True, description="Compare the original's layers with the exported graph's tensors")
    samples: int = Field(4, ge=1, description="How many samples (those with the largest output error)")
    tolerance: float = Field(1e-3, gt=0, description="Relative error (max |err| / max |ref|) that counts as divergent")


class Validation(Strict):
    data: Data = Field(default_factory=Data)
    latency: Latency = Field(default_factory=Latency)
    shape_sweep: bool = Field(True, description="Also compare at size 1 and half size of every dynamic axis")
    localize: Localize = Field(default_factory=Localize)


class Calibration(Strict):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(64, ge=1, description="Drawn from the validation data with the seed; their hash is recorded")
    seed: int = 0


class Fallback(Strict):
    """Accuracy-aware fallback: when the variant misses its parity gates, keep the nodes that add the most
    quantization noise in float and quantize again, within a budget."""

    enabled: bool = True
    max_rounds: int = Field(4, ge=1)
    nodes_per_round: int = Field(2, ge=1)
    max_excluded_fraction: float = Field(0.25, gt=0, le=1, description="Of the quantizable nodes")


class OutputGate(Strict):
    atol: float | None = Field(None, ge=0)
    rtol: float | None = Field(None, ge=0)
    min_cosine: float | None = Field(None, ge=-1, le=1, description="Cosine of the whole output tensor")
    min_mean_cosine: float | None = Field(None, ge=-1, le=1, description="Mean of per-sample cosines (embeddings)")
    min_top1: float | None = Field(None, ge=0, le=1, description="Fraction of rows whose argmax agrees")


class ParityGates(Strict):
    default: OutputGate = Field(default_factory=lambda: OutputGate(atol=1e-4, rtol=1e-3, min_cosine=0.9999))
    outputs: dict[str, OutputGate] = Field(default_factory=dict, description="Per output name; overrides default")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="Needs labels; fraction, 0.005 = 0.5 %")


class LatencyGates(Strict):
    max_p95_ms: float | dict[int, float] | None = Field(None, description="ONNX Runtime p95, all or per batch size")
    min_speedup: float | dict[int, float] | None = Field(None, description="Original p50 / ONNX Runtime p50")
    max_regression: float | None = Field(
        None, ge=0, description="Fail when ONNX Runtime p50 is slower than the previous published version's by more "
        "than this fraction (0.2 = 20 %); this machine drifts 15-20 % between runs"
    )


class OlivePass(Strict):
    """One Olive pass, named and configured exactly as Olive defines it (e.g. OnnxStaticQuantization)."""

    type: str = Field(min_length=1, description="Olive pass name, e.g. OnnxDynamicQuantization")
    config: dict[str, Any] = Field(default_factory=dict, description="The pass's parameters as Olive names them")


class Variant(Strict):
    """A precision variant built from the optimized FP32 model and validated against the original."""

    name: Slug
    kind: Literal["fp16", "int8-dynamic", "int8-static", "olive"]
    passes: list[OlivePass] | None = Field(
        None, description="olive: Olive passes run in order; static quantization calibrates on `calibration` samples"
    )
    per_channel: bool = True
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="auto: on CPUs without VNNI (u8s8 can saturate on AVX2), recorded in the manifest"
    )
    activation_type: Literal["uint8", "int8"] = Field("uint8", description="int8-static activations")
    weight_type: Literal["int8", "uint8"] = "int8"
    calibration: Calibration = Field(default_factory=Calibration)
    keep_io_types: bool = Field(True, description="fp16: keep float32 inputs and outputs")
    op_block_list: list[str] = Field(default_factory=list, description="fp16: op types kept in float32")
    fallback: Fallback = Field(default_factory=Fallback)
    gates: ParityGates | None = Field(None, description="Parity gates for this variant; default: gates.parity")

    @model_validator(mode="after")
    def _passes_for_olive(self) -> "Variant":
        if self.kind == "olive" and not self.passes:
            raise ValueError("passes: kind olive needs a non-empty list of {type: <OlivePassName>, config: {...}}")
        if self.kind != "olive" and self.passes is not None:
            raise ValueError(f"passes: only kind olive runs Olive passes (this variant is {self.kind})")
        return self


class Gates(Strict):
    parity: ParityGates = Field(default_factory=ParityGates)
    latency: LatencyGates = Field(default_factory=LatencyGates)


class TritonTarget(Strict):
    """ONNX Runtime inside Triton Inference Server: a model repository with config.pbtxt."""

    max_batch_size: int = Field(32, ge=0, description="0 turns batching off; > 0 needs a dynamic first axis")
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="Each <= max_batch_size; default: none (Triton forms the largest batches)"
    )
    max_queue_delay_us: int | None = Field(
        None, ge=0, description="Default: gates.latency.max_p95_ms minus twice the measured p95 of the largest batch"
    )
    instance_count: int = Field(1, ge=1)
    instance_kind: Literal["cpu", "gpu"] = Field("cpu", description="instance_group kind (KIND_CPU / KIND_GPU)")
    accelerator: Literal["tensorrt", "openvino"] | None = Field(
        None, description="optimization.execution_accelerators: tensorrt (gpu instances) or openvino (cpu)"
    )
    precision_mode: Literal["FP32", "FP16", "INT8"] = Field("FP32", description="TensorRT precision_mode")
    outputs: list[str] | None = Field(None, description="Outputs to serve; default: every output of the ONNX graph")
    warmup: bool = Field(True, description="model_warmup from the validation samples")

    @model_validator(mode="after")
    def _consistent(self) -> "TritonTarget":
        too_big = [b for b in self.preferred_batch_sizes if b > self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes: {too_big[0]} is above max_batch_size ({self.max_batch_size})")
        if self.accelerator == "tensorrt" and self.instance_kind != "gpu":
            raise ValueError("accelerator tensorrt runs on GPU instances: set instance_kind: gpu")
        if self.accelerator == "openvino" and self.instance_kind != "cpu":
            raise ValueError("accelerator openvino runs on CPU instances: set instance_kind: cpu")
        return self


class TorchServeTarget(Strict):
    """ONNX Runtime inside TorchServe: a .mar with an onnxruntime handler, model-config.yaml, config.properties."""

    min_workers: int = Field(1, ge=1)
    max_workers: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    max_batch_delay_ms: int = Field(5, ge=0)
    response_timeout_s: int = Field(120, ge=1)
    outputs: list[str] | None = Field(None, description="Outputs to return; default: every output of the ONNX graph")
    address: str = Field("127.0.0.1", description="Interface TorchServe binds; 127.0.0.1 unless you mean it")
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082

    @model_validator(mode="after")
    def _workers(self) -> "TorchServeTarget":
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers})")
        return self


class TfServingTarget(Strict):
    """The original TensorFlow SavedModel for TensorFlow Serving (TensorFlow/Keras sources only)."""

    max_batch_size: int = Field(32, ge=1)
    batch_timeout_micros: int | None = Field(None, ge=0, description="Default: from gates.latency.max_p95_ms")
    allowed_batch_sizes: list[Annotated[int, Field(ge=1)]] | None = Field(None, description="Default: powers of 2")
    num_batch_threads: int | None = Field(None, ge=1, description="Default: the validation thread count")
    max_enqueued_batches: int = Field(100, ge=1)
    version_labels: dict[str, str] = Field(default_factory=lambda: {"stable": "latest"},
                                           description="label -> version ('latest' = the published one)")


class Serving(Strict):
    targets: list[Literal["triton", "torchserve", "tf_serving"]] = Field(
        default_factory=list, description="Serving configs to generate; the ORT session config is always written"
    )
    triton: TritonTarget = Field(default_factory=TritonTarget)
    torchserve: TorchServeTarget = Field(default_factory=TorchServeTarget)
    tf_serving: TfServingTarget = Field(default_factory=TfServingTarget)


class WriteBack(Strict):
    """Register the published ONNX model back in MLflow (onnx flavor) and move an alias when every gate passed."""

    enabled: bool = False
    model_name: str | None = Field(None, description="Target registered model; default: <source name>-onnx")
    alias: str | None = Field("optimized", description="Alias moved to the new version (only when gates pass)")
    stage: Literal["Staging", "Production", "Archived"] | None = Field(
        None, description="Legacy registry stage to transition to, for registries that still use stages"
    )
    experiment: str = Field("kiln-builds", description="Experiment of the write-back runs")
    tracking_uri: str | None = Field(None, description="Default: the source's tracking URI")


class Publish(Strict):
    dest: str | None = Field(None, description="Folder for bundles; default: <artifacts>/bundles")
    write_back: WriteBack = Field(default_factory=WriteBack)


class TuneSpace(Strict):
    """What artifacts to build and measure. Each exporter x fusion option gives an FP32 model; each precision
    variant of each of those is another candidate. Empty lists mean the recipe's own choice."""

    exporters: list[Literal["dynamo", "torchscript"]] = Field(
        default_factory=list, description="Default: export.exporter (on transformers the two fuse differently)"
    )
    fusion: list[Optimize] = Field(default_factory=list, description="Optimization options; default: [optimize]")
    precisions: list[Variant] = Field(
        default_factory=list,
        description="Variants built only as tuning candidates (besides `variants`); a precision kind a target "
        "allows but no variant declares gets kiln's default for it",
    )


class TuneBudget(Strict):
    max_trials: int = Field(40, ge=1, description="Latency trials per target (screening, search, final)")
    time_budget_s: float = Field(600.0, gt=0, description="Wall time per target before the search stops")
    top_candidates: int = Field(2, ge=1, description="Artifacts whose session settings are searched after screening")


class TuneMeasure(Strict):
    warmup: int = Field(3, ge=1)
    iterations: int = Field(30, ge=5, description="Timed runs per trial and batch size (fewer when a call is slow)")
    trial_seconds: float = Field(3.0, gt=0, description="Time a trial may take per batch size")
    final_iterations: int = Field(100, ge=10, description="Timed runs for the final, interleaved comparison")
    final_seconds: float = Field(10.0, gt=0, description="Time the final comparison may take per batch size")


class Tune(Strict):
    """Hardware-targeted tuning: per target, measure every candidate artifact and session setting the target's
    profile allows, keep the fastest that passes the parity gates."""

    targets: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1,
                               description=f"Profiles: built-in ({', '.join(BUILTIN)}) or from `profiles`")
    profiles: dict[str, TargetProfile] = Field(default_factory=dict, description="Define or override profiles")
    publish: str | None = Field(None, description="The target whose winner `select: tuned` publishes; default: the first")
    objective: Literal["p50", "p95", "throughput"] = Field(
        "p95", description="Minimized over the batch sizes (geometric mean); throughput = ms per item"
    )
    batch_sizes: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="Default: validation.latency.batch_sizes"
    )
    space: TuneSpace = Field(default_factory=TuneSpace)
    gates: ParityGates | None = Field(
        None, description="Parity gates for kiln's default precision candidates (auto-*); default: gates.parity"
    )
    budget: TuneBudget = Field(default_factory=TuneBudget)
    measure: TuneMeasure = Field(default_factory=TuneMeasure)

    @model_validator(mode="after")
    def _known_targets(self) -> "Tune":
        for name in self.targets:
            if name not in self.profiles and name not in BUILTIN:
                raise ValueError(f"targets: {name!r} is neither built in ({', '.join(BUILTIN)}) nor in tune.profiles")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets: each target once")
        if self.publish is not None and self.publish not in self.targets:
            raise ValueError(f"publish: {self.publish!r} is not one of tune.targets ({', '.join(self.targets)})")
        return self

    @property
    def published_target(self) -> str:
        return self.publish or self.targets[0]


class Recipe(Strict):
    name: Slug
    source: Source
    inputs: list[TensorDecl] | None = Field(None, description="Needed when the MLflow signature does not say")
    outputs: list[str] | None = Field(None, description="Output names when the MLflow signature does not say")
    export: Export = Field(default_factory=Export)
    optimize: Optimize = Field(default_factory=Optimize)
    validation: Validation = Field(default_factory=Validation)
    gates: Gates = Field(default_factory=Gates)
    variants: list[Variant] = Field(default_factory=list, description="Precision variants besides fp32")
    select: str = Field("fp32", description="What the bundle publishes: fp32, a variant name, or tuned (the tuned "
                        "winner of tune.publish)")
    tune: Tune | None = Field(None, description="Hardware-targeted tuning; winners go to the bundle's targets/")
    serving: Serving = Field(default_factory=Serving)
    publish: Publish = Field(default_factory=Publish)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        measured = set(self.validation.latency.batch_sizes)
        for field in ("max_p95_ms", "min_speedup"):
            value = getattr(self.gates.latency, field)
            if isinstance(value, dict):
                for batch in value:
                    if batch not in measured:
                        raise ValueError(
                            f"gates.latency.{field}: batch size {batch} is not in validation.latency.batch_sizes"
                        )
        if self.gates.parity.max_accuracy_drop is not None and not self.validation.data.labels:
            raise ValueError("gates.parity.max_accuracy_drop needs validation.data.labels")
        variant_names = [v.name for v in self.variants]
        if {"fp32", "tuned"} & set(variant_names) or len(set(variant_names)) != len(variant_names):
            raise ValueError("variants: names must be unique and not 'fp32' (the optimized model) or 'tuned'")
        for variant in self.variants:
            for index, olive_pass in enumerate(variant.passes or []):
                problem = _olive_pass_problem(olive_pass.type)
                if problem:
                    raise ValueError(f"variants.{variant.name}.passes[{index}].type: {problem}")
        if self.select == "tuned":
            if self.tune is None:
                raise ValueError("select: tuned needs a `tune` section")
        elif self.select != "fp32" and self.select not in variant_names:
            raise ValueError(f"select: {self.select!r} is neither fp32, tuned nor a variant "
                             f"({', '.join(variant_names) or 'none'})")
        if self.tune:
            names = variant_names + [v.name for v in self.tune.space.precisions]
            if "fp32" in names or "tuned" in names or len(set(names)) != len(names):
                raise ValueError("tune.space.precisions: names must be unique across variants and not fp32/tuned")
        if self.inputs:
            names = [t.name for t in self.inputs]
            if len(set(names)) != len(names):
                raise ValueError("inputs: tensor names must be unique")
        return self


def _olive_pass_problem(name: str) -> str | None:
    """Olive's own registry of pass names, read without importing Olive (stages/olive.py knows where)."""
    from stages.olive import unknown_pass

    return unknown_pass(name)


def _field_path(error: dict) -> str:
    parts = [str(p) for p in error["loc"] if not str(p).startswith("function-after")]
    return ".".join(parts) or "(recipe)"


def validation_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        path = _field_path(item)
        if item["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown key (check the spelling; `kiln schema` lists the fields)")
        elif item["type"] == "missing":
            problems.append(f"{path}: required field is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            # A section's cross-field check names its field first ("publish: ..."): join it to the path.
            field = re.match(r"^([a-z_][\w.\-\[\]]*): ", message)
            if field:
                path = field[1] if path == "(recipe)" else f"{path}.{field[1]}"
                message = message[field.end():]
            problems.append(f"{path}: {message}")
    return problems


def recipe_problems(path: Path) -> tuple[Recipe | None, list[str]]:
    """Parse and validate a recipe; return it with no problems, or None with every problem found."""
    try:
        text = path.read_text()
    except OSError as exc:
        return None, [f"cannot read recipe: {exc.strerror}"]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        return None, [f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"]
    if not isinstance(data, dict):
        return None, ["a recipe is a YAML mapping with at least 'name' and 'source'"]
    try:
        return Recipe.model_validate(data), []
    except ValidationError as exc:
        return None, validation_problems(exc)


def load_recipe(path: Path) -> Recipe:
    recipe, problems = recipe_problems(path)
    if recipe is None:
        more = f" (and {len(problems) - 1} more; run `kiln validate {path}`)" if len(problems) > 1 else ""
        raise RecipeError(f"recipe {path}: {problems[0]}{more}")
    return recipe


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of a models:/ URI that the schema already accepted."""
    match = MODEL_URI.match(uri)
    assert match, uri
    return match["name"], match["alias"], match["version"]
