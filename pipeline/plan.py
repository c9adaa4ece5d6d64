"""Turn a recipe into a DAG of steps. A step's cache key is computed when its inputs are known:

    key = sha256(stage, stage VERSION, keyed config, each input's output hash, external files' sha256,
                 versions of the tools the stage uses)

so a step re-runs exactly when something it reads changed, and a step whose inputs came out byte-identical
is reused even if something further upstream changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import hardware
from pipeline.hashing import sha256_file, sha256_json
from pipeline.mlflow_registry import SourceRef
from pipeline.recipe import Recipe, Variant
from pipeline.settings import Settings
from pipeline.store import Entry
from pipeline.versions import versions
from stages import load_stage


@dataclass
class Step:
    recipe: str
    stage: str
    config: dict[str, Any]  # keyed
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> upstream step id
    files: dict[str, str] = field(default_factory=dict)  # name -> external file whose content is keyed
    context: dict[str, Any] = field(default_factory=dict)  # not keyed: where things live
    after: list[str] = field(default_factory=list)  # steps that must finish first, whose outputs it does not read
    # Not keyed: what a worker needs (num_cpus, num_gpus, memory in bytes, custom such as "target:cuda": 1);
    # empty means 1 CPU. Distributed executors schedule by it; local ones ignore it.
    resources: dict[str, float] = field(default_factory=dict)
    # Not keyed: a failure here does not fail the recipe. Optional steps that read its output fail with it;
    # other steps run without that input and find the reason in context["missing"] (tuning candidates).
    optional: bool = False

    @property
    def id(self) -> str:
        return f"{self.recipe}:{self.stage}"


@dataclass
class RecipePlan:
    recipe: Recipe
    path: Path
    source: SourceRef
    steps: list[Step]  # topological order
    bundle_dest: Path  # where the publish step's output is delivered

    @property
    def name(self) -> str:
        return self.recipe.name


def step_tools(step: Step, inputs: dict[str, Entry]) -> dict[str, str | None]:
    """Versions of the tools the step's stage uses (it may look at its inputs, e.g. the model's flavor)."""
    return versions(load_stage(step.stage).tools(step.config, {name: e.out for name, e in inputs.items()}))


def step_key(step: Step, inputs: dict[str, Entry]) -> str:
    stage = load_stage(step.stage)
    return sha256_json(
        {
            "stage": step.stage,
            "stage_version": stage.VERSION,
            "config": step.config,
            "inputs": {name: entry.output_hash for name, entry in sorted(inputs.items())},
            "files": {name: sha256_file(Path(path)) for name, path in sorted(step.files.items())},
            "tools": step_tools(step, inputs),
        }
    )


def _resolve_path(recipe_path: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (recipe_path.parent / path).resolve()


def recipe_digest(recipe: Recipe) -> str:
    """Hash of the recipe's meaning (not its text: comments and key order do not count)."""
    return sha256_json(recipe.model_dump(mode="json"))


def _baseline(recipe: Recipe, dest_root: Path, version: str) -> tuple[dict, dict]:
    """The previous published version's manifest, for the latency regression gate: (files, context)."""
    if recipe.gates.latency.max_regression is None:
        return {}, {}
    older = []
    for manifest in (dest_root / recipe.name).glob("v*/manifest.json"):
        number = manifest.parent.name[1:]
        if number.isdigit() and version.isdigit() and int(number) < int(version):
            older.append((int(number), manifest))
    if not older:
        return {}, {}
    _, latest = max(older)
    return {"baseline": str(latest)}, {"baseline": str(latest)}


# The precision a tuning target allows but no variant of the recipe declares: kiln's default for that kind.
DEFAULT_PRECISIONS = [
    Variant(name="auto-fp16", kind="fp16"),
    Variant(name="auto-int8-dynamic-pc", kind="int8-dynamic", per_channel=True),
    Variant(name="auto-int8-dynamic-pt", kind="int8-dynamic", per_channel=False),
    Variant(name="auto-int8-static-pc", kind="int8-static", per_channel=True),
]


def _tuning_steps(recipe: Recipe, validate: str, source_options: dict) -> list[Step]:
    """The candidate artifacts (exporter x fusion x precision) as ordinary cached steps, reusing the recipe's own
    export/optimize/quantize steps where they coincide, and one tune step per target that measures them."""
    name, tune = recipe.name, recipe.tune
    assert tune is not None
    profiles = {t: hardware.resolve(t, tune.profiles) for t in tune.targets}
    kinds = {k for p in profiles.values() for k in p.precisions}
    precisions = [v for v in [*recipe.variants, *tune.space.precisions] if v.kind in kinds]
    covered = {v.kind for v in precisions}
    precisions += [v for v in DEFAULT_PRECISIONS if v.kind in kinds - covered]
    steps: list[Step] = []
    candidates: dict[str, tuple[str, dict]] = {}  # candidate id -> (step id, what it is)
    for exporter in tune.space.exporters or [recipe.export.exporter]:
        exported = f"{name}:export"
        if exporter != recipe.export.exporter:
            steps.append(Step(name, f"export.{exporter}",
                              {**recipe.export.model_dump(mode="json"), "exporter": exporter,
                               "source_options": source_options},
                              {"model": f"{name}:fetch", "data": f"{name}:data"}, optional=True))
            exported = steps[-1].id
        for index, fusion in enumerate(tune.space.fusion or [recipe.optimize]):
            base = f"{exporter}.f{index}"
            own = exported == f"{name}:export" and fusion == recipe.optimize
            if not own:
                steps.append(Step(name, f"optimize.{base}", fusion.model_dump(mode="json"), {"onnx": exported},
                                  optional=True))
            optimized = f"{name}:optimize" if own else steps[-1].id
            described = {"exporter": exporter, "fusion": fusion.model_dump(mode="json")}
            if "fp32" in kinds:
                candidates[f"{base}.fp32"] = (optimized, {**described, "precision": "fp32", "variant": "fp32",
                                                          "gates": recipe.gates.parity.model_dump(mode="json")})
            for variant in precisions:
                default = tune.gates if tune.gates and variant in DEFAULT_PRECISIONS else recipe.gates.parity
                gates = (variant.gates or default).model_dump(mode="json")
                if own and variant in recipe.variants:
                    quantized = f"{name}:quantize.{variant.name}"
                else:
                    steps.append(Step(name, f"quantize.{variant.name}.{base}",
                                      {"variant": variant.model_dump(mode="json", exclude={"gates", "passes"}),
                                       "gates": gates, "level": fusion.level},
                                      {"onnx": optimized, "data": f"{name}:data", "metrics": validate},
                                      optional=True))
                    quantized = steps[-1].id
                candidates[f"{base}.{variant.name}"] = (quantized, {**described, "precision": variant.kind,
                                                                    "variant": variant.name, "gates": gates})
    batch_sizes = tune.batch_sizes or recipe.validation.latency.batch_sizes
    for target, profile in profiles.items():
        allowed = {cid: c for cid, c in candidates.items() if c[1]["precision"] in profile.precisions}
        config = {
            "target": target,
            "profile": profile.model_dump(mode="json"),
            "publish": target == tune.published_target,
            "objective": tune.objective,
            "batch_sizes": batch_sizes,
            "budget": tune.budget.model_dump(mode="json"),
            "measure": tune.measure.model_dump(mode="json"),
            "candidates": {cid: what for cid, (_, what) in allowed.items()},
        }
        inputs = {"data": f"{name}:data", "reference": validate,
                  **{f"cand.{cid}": sid for cid, (sid, _) in allowed.items()}}
        steps.append(Step(name, f"tune.{target}", config, inputs, resources=profile.resources))
    return steps


def plan_recipe(recipe: Recipe, recipe_path: Path, source: SourceRef, settings: Settings) -> RecipePlan:
    name = recipe.name
    registry = {"tracking_uri": source.tracking_uri}
    spec = {
        "inputs": [t.model_dump(mode="json") for t in recipe.inputs] if recipe.inputs else None,
        "outputs": recipe.outputs,
    }

    dest_root = _resolve_path(recipe_path, recipe.publish.dest) if recipe.publish.dest else settings.bundles
    source_options = {"signature": recipe.source.signature}  # how the original model is called
    validate_config = {
        "latency": recipe.validation.latency.model_dump(mode="json"),
        "shape_sweep": recipe.validation.shape_sweep,
        "localize": recipe.validation.localize.model_dump(mode="json"),
        "source_options": source_options,
    }
    data_config = recipe.validation.data.model_dump(mode="json")
    data_files: dict[str, str] = {}
    data_context: dict[str, Any] = dict(registry)
    if recipe.validation.data.source == "npz":
        npz = _resolve_path(recipe_path, recipe.validation.data.path or "")
        if not npz.is_file():
            from pipeline.errors import RecipeError

            raise RecipeError(f"recipe {recipe_path}: validation.data.path: no such file {npz}")
        data_config["path"] = None  # the file's content is keyed, not where it lies
        data_files["npz"] = str(npz)
        data_context["npz"] = str(npz)

    steps = [
        Step(name, "fetch", {"source": source.identity()}, context=registry),
        Step(name, "data", {"data": data_config, **spec}, {"model": f"{name}:fetch"}, data_files, data_context),
        Step(
            name,
            "export",
            {**recipe.export.model_dump(mode="json"), "source_options": source_options},
            {"model": f"{name}:fetch", "data": f"{name}:data"},
        ),
        Step(name, "optimize", recipe.optimize.model_dump(mode="json"), {"onnx": f"{name}:export"}),
        Step(name, "validate", validate_config,
             {"model": f"{name}:fetch", "data": f"{name}:data", "onnx": f"{name}:optimize",
              "exported": f"{name}:export"}),
        # Only the selected variant's gate stops the build; the others are judged and reported.
        Step(name, "gate", {"gates": recipe.gates.model_dump(mode="json"), "blocking": recipe.select == "fp32"},
             {"metrics": f"{name}:validate"}, *_baseline(recipe, dest_root, source.version)),
    ]
    chains = {"fp32": {"onnx": f"{name}:optimize", "metrics": f"{name}:validate", "verdicts": f"{name}:gate"}}
    for variant in recipe.variants:
        v = variant.name
        parity = (variant.gates or recipe.gates.parity).model_dump(mode="json")
        if variant.kind == "olive":  # Olive's passes build the variant; validated and gated like the others
            built_by = Step(name, f"olive.{v}",
                            {"variant": variant.model_dump(mode="json", include={"name", "passes", "calibration"}),
                             "level": recipe.optimize.level},
                            {"onnx": f"{name}:optimize", "data": f"{name}:data"})
        else:
            built_by = Step(name, f"quantize.{v}",
                            {"variant": variant.model_dump(mode="json", exclude={"gates", "passes"}), "gates": parity,
                             "level": recipe.optimize.level},
                            {"onnx": f"{name}:optimize", "data": f"{name}:data", "metrics": f"{name}:validate"})
        steps += [
            built_by,
            # Layer-by-layer against the original on the variant itself: where quantization hurts.
            Step(name, f"validate.{v}", validate_config,
                 {"model": f"{name}:fetch", "data": f"{name}:data", "onnx": built_by.id, "exported": built_by.id}),
            Step(name, f"gate.{v}",
                 {"gates": {**recipe.gates.model_dump(mode="json"), "parity": parity}, "blocking": recipe.select == v},
                 {"metrics": f"{name}:validate.{v}", "quantized": built_by.id},
                 *_baseline(recipe, dest_root, source.version)),
        ]
        chains[v] = {"onnx": built_by.id, "metrics": f"{name}:validate.{v}", "verdicts": f"{name}:gate.{v}"}
    tuned = {}
    if recipe.tune:
        steps += _tuning_steps(recipe, f"{name}:validate", source_options)
        tuned = {f"tune.{t}": f"{name}:tune.{t}" for t in recipe.tune.targets}
        if recipe.select == "tuned":
            # The winner, validated in full with the exact session settings it won with.
            winner = f"{name}:tune.{recipe.tune.published_target}"
            steps += [
                Step(name, "validate.tuned", validate_config,
                     {"model": f"{name}:fetch", "data": f"{name}:data", "onnx": winner, "exported": winner,
                      "session": winner}),
                Step(name, "gate.tuned", {"gates": recipe.gates.model_dump(mode="json"), "blocking": True},
                     {"metrics": f"{name}:validate.tuned", "tuned": winner},
                     *_baseline(recipe, dest_root, source.version)),
            ]
            chains["tuned"] = {"onnx": winner, "metrics": f"{name}:validate.tuned", "verdicts": f"{name}:gate.tuned"}
    bundle_dest = dest_root / name / f"v{source.version}"
    built = {"model": f"{name}:fetch", "data": f"{name}:data", **chains[recipe.select]}
    variants = {}
    if recipe.variants:  # every variant's measurements and verdicts, for the report's variant table
        for v, chain in chains.items():
            variants.update({f"variant.{v}.{part}": step for part, step in chain.items()})
    serving = {}
    for target in recipe.serving.targets:
        # After the gate (no serving config for a model that failed it) but not keyed on its verdicts, so a
        # changed threshold does not rebuild archives. The bundle's final path is keyed: some servers want
        # absolute paths in their configs.
        step = Step(
            name,
            f"serve.{target}",
            {
                "target": target,
                "config": getattr(recipe.serving, target).model_dump(mode="json"),
                "model_name": name,
                "latency_gates": recipe.gates.latency.model_dump(mode="json"),
                "source_options": source_options,
                "bundle_dest": str(bundle_dest),
            },
            {k: v for k, v in built.items() if k != "verdicts"},
            after=[chains[recipe.select]["verdicts"]],
        )
        steps.append(step)
        serving[f"serving.{target}"] = step.id
    steps.append(
        Step(
            name,
            "publish",
            {"recipe": recipe.model_dump(mode="json"), "recipe_sha256": recipe_digest(recipe)},
            {**built, "export": f"{name}:export", **serving, **variants, **tuned},
            context={"source_uri": source.uri},
        )
    )
    write_back = recipe.publish.write_back
    if write_back.enabled:
        # Keyed on the bundle (and the settings), so an unchanged build registers nothing new.
        steps.append(
            Step(
                name,
                "register",
                {"write_back": write_back.model_dump(mode="json", exclude={"tracking_uri"})},
                {"bundle": f"{name}:publish"},
                context={"tracking_uri": write_back.tracking_uri or source.tracking_uri},
            )
        )
    return RecipePlan(recipe, recipe_path, source, steps, bundle_dest)
