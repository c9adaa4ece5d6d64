"""Turn a recipe into a DAG of steps, derived from what each stage declares.

Every stage module in the registry may add steps for a recipe (`plan(graph)`) and for every candidate model
(`plan_candidate(graph, candidate)`: validate and gate do). A step names its inputs by the steps that produce
them; the planner checks each step's config against its stage's `Config` (a bad value is a recipe error with
its field path, before anything runs), each input against the kinds the stage declares (`INPUTS`) and the
producer's `OUTPUT`, and orders the steps so that every step comes after what it reads.

A step's cache key is computed when its inputs are known:

    key = sha256(stage, stage VERSION, keyed config, each input's output hash, external files' sha256,
                 versions of the tools the stage uses)

so a step re-runs exactly when something it reads changed, and a step whose inputs came out byte-identical
is reused even if something further upstream changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline import registry
from pipeline.deliver import version_folder
from pipeline.errors import RecipeError
from pipeline.hashing import sha256_file, sha256_json
from pipeline.mlflow_registry import SourceRef
from pipeline.recipe import Recipe, validation_problems
from pipeline.settings import Settings
from pipeline.store import Entry
from pipeline.trust import FETCH_RECORD, allows_pickle
from pipeline.versions import versions


@dataclass
class Step:
    recipe: str
    stage: str  # the stage, or `<stage>.<what>` for one variant, target or candidate of it
    config: BaseModel  # the stage's Config; keyed
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
    deliver_to: Path | None = None  # not keyed: where the runner puts this step's output once built (a bundle)

    @property
    def id(self) -> str:
        return f"{self.recipe}:{self.stage}"


@dataclass
class Candidate:
    """A model the recipe may publish (fp32, each precision variant, the tuned winner), and the steps that
    measure and judge it, filled in by the stages that plan per candidate."""

    name: str
    model: str  # the step whose out/ holds its model.onnx
    exported: str  # the graph compared layer by layer against the original
    parity: BaseModel | None = None  # its own parity gates; None: the recipe's
    checks: dict[str, str] = field(default_factory=dict)  # more inputs its gate reads (how it was built)
    session: str | None = None  # the step whose session settings it is validated with
    metrics: str = ""
    verdicts: str = ""

    @property
    def suffix(self) -> str:
        return "" if self.name == "fp32" else f".{self.name}"


class Graph:
    """What a stage's plan hook sees: the recipe, where its bundle goes, the candidates, and `add` for steps.
    Step names are local to the recipe (`optimize`, `quantize.int8`); inputs name the steps that produce them."""

    def __init__(self, recipe: Recipe, recipe_path: Path, source: SourceRef, dest_root: Path,
                 context: dict[str, Any] | None = None):
        self.recipe, self.recipe_path, self.source, self.dest_root = recipe, recipe_path, source, dest_root
        self.context = context or {}  # every step's, not keyed: whether the source is trusted, fetch's record
        self.recipe_digest = recipe_digest(recipe)
        # Bundles are immutable: another recipe's build of this version gets its own folder (pipeline/deliver.py).
        self.bundle_dest = version_folder(dest_root / recipe.name, source.version, self.recipe_digest)
        self.steps: dict[str, Step] = {}
        self.candidates: dict[str, Candidate] = {}

    def add(self, stage: str, config: dict | BaseModel, inputs: dict[str, str] | None = None, **options: Any) -> str:
        """Plan one step; returns its name. `options`: files, context, after, resources, optional, deliver_to."""
        if stage in self.steps:
            raise RecipeError(f"recipe {self.recipe_path}: two steps named {stage!r}")
        if stage.split(".", 1)[0] not in registry.stage_names():
            raise RecipeError(f"recipe {self.recipe_path}: step {stage!r}: no such stage in stages.STAGES")
        inputs = inputs or {}
        _check_input_names(stage, inputs)
        prefix = f"{self.recipe.name}:"
        options["after"] = [prefix + name for name in options.get("after", [])]
        options["context"] = {**self.context, **options.get("context", {})}
        self.steps[stage] = Step(self.recipe.name, stage, self._config(stage, config),
                                 {n: prefix + s for n, s in inputs.items()}, **options)
        return stage

    def add_candidate(self, name: str, **described: Any) -> Candidate:
        """A model that may be published: every stage with a `plan_candidate` hook plans its steps for it."""
        candidate = self.candidates[name] = Candidate(name, **described)
        for module in registry.planners():
            if hasattr(module, "plan_candidate"):
                module.plan_candidate(self, candidate)
        return candidate

    def variants(self, kinds: dict) -> list:
        """The recipe's precision variants of the given kinds (a stage's VARIANTS), in recipe order."""
        return [variant for variant in self.recipe.variants if variant.kind in kinds]

    def add_variant(self, variant, built: str) -> Candidate:
        """A precision variant built by step `built`: compared layer by layer on itself, its gate told how it was
        built (the fallback rounds), held to its own parity gates or the recipe's."""
        return self.add_candidate(variant.name, model=built, exported=built, parity=variant.gates,
                                  checks={"quantized": built})

    def names(self, prefix: str) -> list[str]:
        """The planned steps whose name starts with prefix (e.g. every `serve.` target), in planning order."""
        return [name for name in self.steps if name.startswith(prefix)]

    @property
    def source_options(self) -> dict[str, str]:
        """How the original model is loaded and called (the TensorFlow signature to use), for every step that does."""
        return {"signature": self.recipe.source.signature}

    def resolve(self, value: str) -> Path:
        return resolve_path(self.recipe_path, value)

    def baseline(self) -> dict[str, dict]:
        """The previous published version's manifest, for the latency regression gate: step files and context."""
        if self.recipe.gates.latency.max_regression is None:
            return {}
        version = self.source.version
        older = [(int(m.parent.name[1:]), m) for m in (self.dest_root / self.recipe.name).glob("v*/manifest.json")
                 if m.parent.name[1:].isdigit() and version.isdigit() and int(m.parent.name[1:]) < int(version)]
        if not older:
            return {}
        latest = str(max(older)[1])
        return {"files": {"baseline": latest}, "context": {"baseline": latest}}

    def _config(self, stage: str, config: dict | BaseModel) -> BaseModel:
        model = registry.stage(stage).Config
        data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(f"recipe {self.recipe_path}: step {stage}: {validation_problems(exc)[0]} "
                              f"(a stage's plan hook passed a value its Config refuses)") from None

    def ordered(self) -> list[Step]:
        """Every step after the steps it reads, otherwise in planning order; unknown or mistyped inputs refused."""
        by_id = {step.id: step for step in self.steps.values()}
        for step in by_id.values():
            _check_wiring(step, by_id, self.recipe_path)
        done: dict[str, Step] = {}
        while len(done) < len(by_id):
            ready = [s for s in by_id.values() if s.id not in done
                     and all(i in done for i in [*s.inputs.values(), *s.after])]
            if not ready:
                raise RecipeError(f"recipe {self.recipe_path}: steps wait on each other "
                                  f"({', '.join(s for s in by_id if s not in done)})")
            done[ready[0].id] = ready[0]
        return list(done.values())


def resolve_path(recipe_path: Path, value: str) -> Path:
    """A path from the recipe: relative to the recipe's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (recipe_path.parent / path).resolve()


def _declared_kind(stage: str, name: str) -> str | None:
    declared = registry.stage(stage).INPUTS
    return declared.get(name) or next((kind for pattern, kind in declared.items() if fnmatchcase(name, pattern)), None)


def _check_input_names(stage: str, inputs: dict[str, str]) -> None:
    for name in inputs:
        if _declared_kind(stage, name) is None:
            raise RecipeError(f"step {stage}: input {name!r} is not one its stage declares "
                              f"({', '.join(registry.stage(stage).INPUTS)})")


def _check_wiring(step: Step, by_id: dict[str, Step], recipe_path: Path) -> None:
    for name, upstream in step.inputs.items():
        producer = by_id.get(upstream)
        if producer is None:
            raise RecipeError(f"recipe {recipe_path}: step {step.stage} reads {name!r} from {upstream}, which is not planned")
        wanted, made = _declared_kind(step.stage, name), registry.stage(producer.stage).OUTPUT
        if wanted != made:
            raise RecipeError(f"recipe {recipe_path}: step {step.stage} wants {wanted} as {name!r}, "
                              f"but {producer.stage} makes {made}")
    for upstream in step.after:
        if upstream not in by_id:
            raise RecipeError(f"recipe {recipe_path}: step {step.stage} waits for {upstream}, which is not planned")


@dataclass
class RecipePlan:
    recipe: Recipe
    path: Path
    source: SourceRef
    steps: list[Step]  # topological order
    bundle_dest: Path  # where the bundle goes (the step with deliver_to says so too)

    @property
    def name(self) -> str:
        return self.recipe.name


def step_tools(step: Step, inputs: dict[str, Entry]) -> dict[str, str | None]:
    """Versions of the tools the step's stage uses (it may look at its inputs, e.g. the model's flavor)."""
    return versions(registry.tools(step.stage, step.config, {name: e.out for name, e in inputs.items()}))


def step_key(step: Step, inputs: dict[str, Entry]) -> str:
    return sha256_json(
        {
            "stage": step.stage,
            "stage_version": registry.stage(step.stage).VERSION,
            "config": registry.keyed_config(step.stage, step.config, {name: e.out for name, e in inputs.items()}),
            "inputs": {name: entry.output_hash for name, entry in sorted(inputs.items())},
            "files": {name: sha256_file(Path(path)) for name, path in sorted(step.files.items())},
            "tools": step_tools(step, inputs),
        }
    )


def recipe_digest(recipe: Recipe) -> str:
    """Hash of the recipe's meaning (not its text: comments and key order do not count)."""
    return sha256_json(recipe.model_dump(mode="json"))


def bundle_root(recipe: Recipe, recipe_path: Path, settings: Settings) -> Path:
    """Where the recipe's bundles go: <artifacts>/bundles, or publish.dest. A relative dest must stay inside the
    artifacts folder, so that a '..' in a shared recipe cannot publish elsewhere; outside it, the user writes an
    absolute path."""
    dest = recipe.publish.dest
    if not dest:
        return settings.bundles
    root = resolve_path(recipe_path, dest)
    if not Path(dest).expanduser().is_absolute() and not root.resolve().is_relative_to(settings.artifacts.resolve()):
        raise RecipeError(f"recipe {recipe_path}: publish.dest: {dest!r} resolves to {root}, outside the artifacts "
                          f"folder {settings.artifacts}; write an absolute path to publish there")
    return root


def plan_recipe(recipe: Recipe, recipe_path: Path, source: SourceRef, settings: Settings) -> RecipePlan:
    """Every stage in registry order adds its steps; the graph is then checked and ordered."""
    trusted = allows_pickle(settings.artifacts, recipe.source.allow_pickle, source.tracking_uri, source.name)
    graph = Graph(recipe, recipe_path, source, bundle_root(recipe, recipe_path, settings),
                  {"allow_pickle": trusted, "fetch_record": str(settings.artifacts / FETCH_RECORD)})
    existing = next((p for p in [graph.bundle_dest, *graph.bundle_dest.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RecipeError(f"recipe {recipe_path}: publish.dest: {existing} is a file, not a folder")
    for module in registry.planners():
        if hasattr(module, "plan"):
            module.plan(graph)
    return RecipePlan(recipe, recipe_path, source, graph.ordered(), graph.bundle_dest)
