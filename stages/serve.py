"""serve: build one serving target's configuration (and packaged model) for a model that passed its gates.

The target is named in the config; each target is a module in stages/targets. A target that does not apply to
this model (e.g. TF Serving for a PyTorch source) is skipped with a stated reason, not an error; a target that
would be broken (config inconsistent with the ONNX graph) is refused with a one-line error before publishing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import model_validator

from pipeline.schema import StageConfig
from stages import artifacts, targets
from stages.gate import LatencyGates

VERSION = 3
SAMPLES = 4


class Config(StageConfig):
    target: str
    config: dict[str, Any]  # the target's own section of the recipe, checked against the target's Config
    model_name: str
    latency_gates: LatencyGates
    source_options: dict[str, str]
    bundle_dest: str  # keyed: some servers want absolute paths in their configs

    @model_validator(mode="after")
    def _target_config(self) -> "Config":
        self.config = targets.target(self.target).Config.model_validate(self.config).model_dump(mode="json")
        return self


INPUTS = {"model": artifacts.SOURCE, "data": artifacts.SAMPLES, "onnx": artifacts.ONNX, "metrics": artifacts.METRICS}
OUTPUT = artifacts.SERVING


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return targets.target(config.target).tools(config, inputs)


def keyed(config: Config, inputs: dict[str, Path]) -> dict:
    """What the key hashes: the bundle's path only for targets whose files hold it (stages/targets/__init__.py),
    so a recipe edit, which publishes into a new immutable bundle folder, rebuilds no other target's files."""
    keyed = config.model_dump(mode="json")
    if not getattr(targets.target(config.target), "USES_BUNDLE_PATH", True):
        del keyed["bundle_dest"]
    return keyed


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    spec = artifacts.spec(inputs["data"])
    feeds = artifacts.inputs(inputs["data"])
    expected = artifacts.candidate(inputs["metrics"])
    reference = artifacts.reference(inputs["metrics"])
    if spec.batch_axis_named:
        feeds = {k: v[:SAMPLES] for k, v in feeds.items()}
        expected = {k: v[:SAMPLES] for k, v in expected.items()}
        reference = {k: v[:SAMPLES] for k, v in reference.items()}
    ctx = targets.TargetContext(
        name=config.model_name,
        source=artifacts.source(inputs["model"]),
        model_dir=artifacts.model_dir(inputs["model"]),
        onnx=artifacts.onnx_model(inputs["onnx"]),
        spec=spec,
        samples=feeds,
        expected=expected,
        reference=reference,
        metrics=artifacts.metrics(inputs["metrics"]),
        latency_gates=config.latency_gates.model_dump(mode="json"),
        source_options=config.source_options,
        bundle_dest=Path(config.bundle_dest),
        allow_pickle=bool(context.get("allow_pickle")),
    )
    module = targets.target(config.target)
    skipped = module.skip_reason(ctx)
    if skipped:
        artifacts.write_skipped(out, skipped)
        return {"target": config.target, "skipped": skipped}
    summary = module.build(ctx, config.config, out)  # the target's section, checked against its Config
    return {"target": config.target, "skipped": None, **summary}


def plan(graph) -> None:
    """One step per serving target, for the candidate the recipe publishes. It runs after that candidate's gate (no
    serving config for a model that failed it) but is not keyed on the verdicts, so a changed threshold does not
    rebuild archives."""
    recipe = graph.recipe
    chosen = graph.candidates[recipe.select]
    for target in recipe.serving.targets:
        config = {"target": target, "config": getattr(recipe.serving, target).model_dump(mode="json"),
                  "model_name": recipe.name, "latency_gates": recipe.gates.latency.model_dump(mode="json"),
                  "source_options": graph.source_options, "bundle_dest": str(graph.bundle_dest)}
        graph.add(f"serve.{target}", config, {"model": "fetch", "data": "data", "onnx": chosen.model,
                                               "metrics": chosen.metrics}, after=[chosen.verdicts])
