"""serve: build one serving target's configuration (and packaged model) for a model that passed its gates.

The target is named in the config; each target is a module in stages/targets. A target that does not apply to
this model (e.g. TF Serving for a PyTorch source) is skipped with a stated reason, not an error; a target that
would be broken (config inconsistent with the ONNX graph) is refused with a one-line error before publishing.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages import targets
from stages.tensors import ModelSpec, load_arrays

VERSION = 2
SAMPLES = 4


def tools(config: dict, inputs: dict[str, Path]) -> list[str]:
    return targets.target(config["target"]).tools(config, inputs)


def run(config: dict, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    spec = ModelSpec.load(inputs["data"] / "spec.json")
    feeds = load_arrays(inputs["data"] / "inputs.npz")
    expected = load_arrays(inputs["metrics"] / "candidate.npz")
    reference = load_arrays(inputs["metrics"] / "reference.npz")
    if spec.batch_axis_named:
        feeds = {k: v[:SAMPLES] for k, v in feeds.items()}
        expected = {k: v[:SAMPLES] for k, v in expected.items()}
        reference = {k: v[:SAMPLES] for k, v in reference.items()}
    ctx = targets.TargetContext(
        name=config["model_name"],
        source=json.loads((inputs["model"] / "source.json").read_text()),
        model_dir=inputs["model"] / "model",
        onnx=inputs["onnx"] / "model.onnx",
        spec=spec,
        samples=feeds,
        expected=expected,
        reference=reference,
        metrics=json.loads((inputs["metrics"] / "metrics.json").read_text()),
        latency_gates=config["latency_gates"],
        source_options=config["source_options"],
        bundle_dest=Path(config["bundle_dest"]),
    )
    module = targets.target(config["target"])
    skipped = module.skip_reason(ctx)
    if skipped:
        (out / "SKIPPED").write_text(skipped + "\n")
        return {"target": config["target"], "skipped": skipped}
    summary = module.build(ctx, config["config"], out)
    return {"target": config["target"], "skipped": None, **summary}
