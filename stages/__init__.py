"""Stages: pure functions of (input artifacts, config) -> output artifacts.

Each stage module defines
    VERSION: int                              bump when the stage's output for the same inputs changes
    tools(config) -> list[str]                distributions whose versions enter the step's cache key
    run(config, inputs, out, context) -> dict writes files under `out`, returns a small JSON summary

`config` is keyed (it enters the cache key); `context` is not (e.g. where the registry lives). Stage modules
import heavy frameworks inside functions, so loading one to read its VERSION is cheap.
A new stage is a module plus an entry here.
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
