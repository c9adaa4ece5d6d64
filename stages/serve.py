"""serve: build one serving target's configuration (and packaged model) for a model that passed its gates.

The target is named in the config; each target is a module in stages/targets. A target that does not apply to
this model (e.g. TF Serving for a PyTorch source) is skipped with a stated reason, not an error; a target that
would be broken (config inconsistent with the ONNX graph) is refused with a one-line error before publishing.
"""

from __future__ import annotations

from pathlib import Path

from stages import artifacts, targets

VERSION = 2
SAMPLES = 4


def tools(config: dict, inputs: dict[str, Path]) -> list[str]:
    return targets.target(config["target"]).tools(config, inputs)


def run(config: dict, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    spec = artifacts.spec(inputs["data"])
    feeds = artifacts.inputs(inputs["data"])
    expected = artifacts.candidate(inputs["metrics"])
    reference = artifacts.reference(inputs["metrics"])
    if spec.batch_axis_named:
        feeds = {k: v[:SAMPLES] for k, v in feeds.items()}
        expected = {k: v[:SAMPLES] for k, v in expected.items()}
        reference = {k: v[:SAMPLES] for k, v in reference.items()}
    ctx = targets.TargetContext(
        name=config["model_name"],
        source=artifacts.source(inputs["model"]),
        model_dir=artifacts.model_dir(inputs["model"]),
        onnx=artifacts.onnx_model(inputs["onnx"]),
        spec=spec,
        samples=feeds,
        expected=expected,
        reference=reference,
        metrics=artifacts.metrics(inputs["metrics"]),
        latency_gates=config["latency_gates"],
        source_options=config["source_options"],
        bundle_dest=Path(config["bundle_dest"]),
    )
    module = targets.target(config["target"])
    skipped = module.skip_reason(ctx)
    if skipped:
        artifacts.write_skipped(out, skipped)
        return {"target": config["target"], "skipped": skipped}
    summary = module.build(ctx, config["config"], out)
    return {"target": config["target"], "skipped": None, **summary}
