"""Stages: pure functions of (input artifacts, config) -> output artifacts, each declaring what it is.

Each stage module defines
    VERSION: int                     bump when the stage's output for the same inputs changes
    Config                           pydantic model (pipeline.schema.StageConfig) of what a step is keyed on;
                                     validated when the step is planned, so a bad value is a recipe error
    INPUTS: {name: kind}             the artifact kinds it reads (stages/artifacts.py); `*` matches a family
    OUTPUT: kind                     what its out/ folder holds
    tools(config, inputs) -> [str]   distributions whose versions enter the step's cache key
    run(config, inputs, out, context) -> dict   writes files under `out`, returns a small JSON summary
and, to take part in planning, one or both hooks:
    plan(graph)                      add this stage's steps for a recipe (graph.add, graph.add_candidate)
    plan_candidate(graph, candidate) add steps for every model the recipe may publish (validate, gate)
    keyed(config, inputs) -> dict    optional: what the key hashes, when not the whole config
    report_failure(config, inputs, out, context) -> bool   optional, on the stage whose step delivers the bundle
                                     (publish): write a failed build's report from the inputs that exist

`config` is keyed (it enters the cache key); `context` is not (e.g. where the registry lives). Stage modules
import heavy frameworks inside functions, so loading one to read its declarations is cheap. Planning calls the
hooks in the order of STAGES. A new stage is a module plus an entry here; the engine reaches stages only through
pipeline/registry.py.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "fetch": "stages.fetch",
    "data": "stages.data",
    "export": "stages.export",
    "optimize": "stages.optimize",
    "quantize": "stages.quantize",
    "olive": "stages.olive",
    "tune": "stages.tune",
    "validate": "stages.validate",
    "gate": "stages.gate",
    "serve": "stages.serve",
    "publish": "stages.publish",
    "register": "stages.register",
}


def load_stage(name: str) -> ModuleType:
    """A stage module by name; `<stage>.<what>` (serve.triton, quantize.int8, olive.int8, validate.int8) is that stage
    for one serving target or precision variant."""
    name = name.split(".", 1)[0]
    try:
        return importlib.import_module(STAGES[name])
    except KeyError:
        raise KeyError(f"no stage named {name!r}; known: {', '.join(STAGES)}") from None
