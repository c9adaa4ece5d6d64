"""The one door from the engine to the stages: every module in `pipeline/` that needs a stage, a serving target,
a source framework's options or a machine fact asks here, so the engine stays free of framework knowledge and
adding a stage, a target or a framework is a module plus one line in its `stages` registry.

A stage module declares (see stages/__init__.py):

    VERSION                  bump when its output for the same inputs changes
    Config                   pydantic model of what one step is keyed on (validated when the step is planned)
    INPUTS, OUTPUT           the artifact kinds it reads (by input name; `*` matches a family) and writes
    tools(config, inputs)    distributions whose versions key the step
    run(config, inputs, out, context) -> summary
    plan(graph)              optional: add this stage's steps for a recipe
    plan_candidate(graph, c) optional: add steps for every candidate model (validate, gate)
    keyed(config, inputs)    optional: what the key hashes instead of the whole config
    report_failure(config, inputs, out, context)  optional, on the stage that delivers the bundle: the report of
                             a recipe that failed, from the outputs of the steps that finished
"""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, create_model

import stages
from pipeline.schema import Strict
from stages import artifacts, machine, targets


def stage(name: str) -> ModuleType:
    """The module of a stage (`quantize.int8` is the quantize stage for one variant)."""
    return stages.load_stage(name)


def stage_names() -> list[str]:
    return list(stages.STAGES)


def planners() -> list[ModuleType]:
    """Stage modules in registry order, for the planner's hooks."""
    return [stages.load_stage(name) for name in stages.STAGES]


def keyed_config(name: str, config: BaseModel, inputs: dict) -> dict:
    """What a step's key hashes: the stage's own choice (e.g. only the model's framework's options) or its config,
    plus the kiln-wide settings that change the layout of what it writes (the ONNX external-data threshold)."""
    module = stage(name)
    keyed = module.keyed(config, inputs) if hasattr(module, "keyed") else config.model_dump(mode="json")
    return {**keyed, **artifacts.layout_key(module.OUTPUT)}


def tools(name: str, config: BaseModel, inputs: dict) -> list[str]:
    return stage(name).tools(config, inputs)


def run(name: str, config: dict[str, Any], inputs: dict, out, context: dict) -> dict:
    """Run one step on a worker: the config arrives as plain data and is validated into the stage's Config again."""
    module = stage(name)
    return module.run(module.Config.model_validate(config), inputs, out, context)


def report_failure(name: str, config: BaseModel, inputs: dict, out, context: dict) -> bool:
    """Ask the stage that would have delivered a failed recipe's bundle to write its report into `out` from the
    outputs of the steps that finished; False when it has nothing to report (or writes no such report)."""
    module = stage(name)
    return hasattr(module, "report_failure") and module.report_failure(config, inputs, out, context)


# --- the recipe's sections that stages and targets define ----------------------------------------------------------

def variant_model() -> Any:
    """The recipe's `variants` item: a union on `kind` of every variant model a stage declares (VARIANTS)."""
    models = [model for module in planners() for model in getattr(module, "VARIANTS", {}).values()]
    return Annotated[Union[tuple(models)], Field(discriminator="kind")]


def variant_kinds() -> dict[str, list[str]]:
    """kind -> the fields its model has, for error messages that say which kind takes a field."""
    return {kind: list(model.model_fields) for module in planners()
            for kind, model in getattr(module, "VARIANTS", {}).items()}


def serving_model() -> type[BaseModel]:
    """The recipe's `serving` section: `targets` (names from the target registry) and one section per target."""
    names = list(targets.TARGETS)
    sections = {name: (targets.target(name).Config, Field(default_factory=targets.target(name).Config))
                for name in names}
    return create_model(
        "Serving", __base__=Strict,
        targets=(list[Literal[tuple(names)]], Field(  # type: ignore[valid-type]
            default_factory=list, description="Serving configs to generate; the ORT session config is always written")),
        **sections,
    )


def section(stage_name: str, model: str) -> type[BaseModel]:
    """A recipe section a stage defines, e.g. section("export", "Options") or section("gate", "Gates")."""
    return getattr(stage(stage_name), model)


# --- facts about this machine, for `kiln targets` -----------------------------------------------------------------

def describe_machine() -> dict:
    return machine.describe()


def unavailable_reason(provider: str, here: dict) -> str | None:
    return machine.unavailable_reason(provider, here)
