"""publish: assemble the hand-off bundle: the optimized ONNX model, the ORT session config that validate
measured with, sample inputs/outputs, each serving target's files under serving/<target>/, README.md (how to
serve it), manifest.json (lineage, hashes, tool versions, metrics, verdicts), report.md with plots/ and a
self-contained report.html. The runner delivers the bundle to its destination atomically.

A build that fails has no bundle, but its report still matters most then: `report_failure` writes the same
report from whatever was measured before the failure, which the engine places under artifacts/failed/."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.hashing import file_table
from pipeline.schema import StageConfig
from pipeline.versions import environment
from stages import artifacts, report
from stages.report import plots
from stages.tensors import ModelSpec, save_arrays

VERSION = 7


class Config(StageConfig):
    recipe: dict[str, Any]  # the whole recipe as validated, for the manifest
    recipe_sha256: str


INPUTS = {"model": artifacts.SOURCE, "data": artifacts.SAMPLES, "onnx": artifacts.ONNX, "metrics": artifacts.METRICS,
          "verdicts": artifacts.VERDICTS, "export": artifacts.ONNX, "serving.*": artifacts.SERVING,
          "variant.*.onnx": artifacts.ONNX, "variant.*.metrics": artifacts.METRICS,
          "variant.*.verdicts": artifacts.VERDICTS, "tune.*": artifacts.ONNX}
OUTPUT = artifacts.BUNDLE
SAMPLES = 4  # sample requests shipped with the bundle


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return ["numpy"]


def _session_config(spec: ModelSpec, settings: dict, onnx_outputs: list[str], model: str = "model.onnx") -> dict:
    """The ONNX Runtime settings the model was validated (or tuned) with, exactly, plus its I/O."""
    return {
        "model": model,
        **settings,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": t.shape} for t in spec.inputs],
        "outputs": onnx_outputs,
    }


def _tuning_records(inputs: dict[str, Path]) -> dict[str, dict]:
    """Each tuned target's record (every candidate measured, the winner, or why it was skipped), for the report."""
    return {key.split(".", 1)[1]: artifacts.tune_record(inputs[key])
            for key in sorted(k for k in inputs if k.startswith("tune."))}


def _tuned_targets(inputs: dict[str, Path], out: Path, spec: ModelSpec, onnx_outputs: list[str]) -> None:
    """Each tuned target's winner and the settings it won with, under targets/<target>/."""
    for target, record in _tuning_records(inputs).items():
        if record.get("skipped"):
            continue
        folder = out / "targets" / target
        folder.mkdir(parents=True)
        artifacts.copy_onnx(artifacts.onnx_model(inputs[f"tune.{target}"]), folder / "model.onnx")
        settings = artifacts.session_config(inputs[f"tune.{target}"])
        (folder / "session_config.json").write_text(json.dumps(_session_config(spec, settings, onnx_outputs), indent=2))


def build_manifest(config: Config, inputs: dict[str, Path], context: dict, model: dict | None = None) -> dict:
    """What the build measured and decided, from the step outputs in `inputs`: lineage, metrics, variants, tuning,
    serving, verdicts. The bundle has them all; a failed build's report has those of the steps that finished
    before the failure (it needs at least the source, the data and the selected candidate's metrics), and what
    is absent is simply left out. `model` describes the bundle's model file (a failed build has none)."""
    upstream = context["upstream"]
    source = artifacts.source(inputs["model"])
    # no verdicts: the build stopped before the selected candidate was judged (a step it needs failed)
    verdicts = artifacts.verdicts(inputs["verdicts"]) if "verdicts" in inputs else {"passed": False, "verdicts": []}
    serving = _serving(inputs, upstream)
    order = ["model", "data", "export", "onnx", "metrics", "verdicts", *(f"serving.{t}" for t in serving)]
    steps = [upstream[name] for name in order if name in upstream]
    return {
        "kiln_version": __version__,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": {"name": config.recipe["name"], "sha256": config.recipe_sha256, "spec": config.recipe},
        "source": {**{k: source[k] for k in ("uri", "name", "version", "run_id", "flavor", "framework_version")},
                   "requested_uri": context["source_uri"]},
        **({"model": model} if model is not None else {}),
        "steps": [
            {k: step.get(k) for k in ("stage", "key", "config", "tools", "seconds", "summary", "output_hash")}
            for step in steps
        ],
        "tools": _tools(steps),
        "environment": environment(),
        "serving": {t: {k: v for k, v in summary.items() if k != "readme"} for t, summary in serving.items()},
        "variants": _variants(inputs, config.recipe.get("select", "fp32")),
        "tuning": _tuning_records(inputs),
        "metrics": artifacts.metrics(inputs["metrics"]),
        "gates": verdicts,
    }


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    source = artifacts.source(inputs["model"])
    spec = artifacts.spec(inputs["data"])
    metrics = artifacts.metrics(inputs["metrics"])

    artifacts.copy_onnx(artifacts.onnx_model(inputs["onnx"]), out / "model.onnx")
    feeds = artifacts.inputs(inputs["data"])
    candidate = artifacts.candidate(inputs["metrics"])
    if spec.batch_axis_named:
        save_arrays(out / "sample_inputs.npz", {k: v[:SAMPLES] for k, v in feeds.items()})
        save_arrays(out / "sample_outputs.npz", {k: v[:SAMPLES] for k, v in candidate.items()})
    (out / "session_config.json").write_text(
        json.dumps(_session_config(spec, metrics["session"], list(candidate)), indent=2))
    _tuned_targets(inputs, out, spec, list(candidate))
    serving = _serving(inputs, context["upstream"])
    for target, summary in serving.items():
        if not summary.get("skipped"):
            shutil.copytree(inputs[f"serving.{target}"], out / "serving" / target)
    (out / "README.md").write_text(_readme(config.recipe["name"], source, spec, serving))

    manifest = build_manifest(config, inputs, context, model={
        "file": "model.onnx",
        # its initializers, when the model is too large for one protobuf (hashed in `files` like the rest)
        "data_file": artifacts.data_file_name(out / "model.onnx"),
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": t.shape} for t in spec.inputs],
        "outputs": list(candidate),
    })
    _write_reports(out, manifest, inputs)
    return {"files": len(manifest["files"]) + 3, "passed": manifest["gates"]["passed"]}


def report_failure(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> bool:
    """The report of a build that did not pass, from the outputs of the steps that finished (the engine calls it
    with what this stage would have read): report.md, report.html, plots/ and manifest.json in `out`, with
    context["failure"] ({status, reason}) as its headline. False when nothing was measured yet (the build
    failed before the selected candidate was validated): there is nothing to report."""
    if not {"model", "data", "metrics"} <= inputs.keys():
        return False
    manifest = {**build_manifest(config, inputs, context), "failure": context["failure"]}
    _write_reports(out, manifest, inputs)
    return True


def _write_reports(out: Path, manifest: dict, inputs: dict[str, Path]) -> None:
    """plots/, report.md, report.html and manifest.json (whose file table lists what `out` held before them)."""
    metrics = manifest["metrics"]
    images = _plots(metrics, artifacts.source(inputs["model"]), artifacts.reference(inputs["metrics"]),
                    artifacts.candidate(inputs["metrics"]))
    (out / "plots").mkdir(exist_ok=True)
    for name, png in images.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    manifest["files"] = file_table(out)  # every file but the manifest and the reports, which describe them
    for name, text in report.render(manifest, images).items():
        (out / name).write_text(text)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=_jsonable))


def _serving(inputs: dict[str, Path], upstream: dict) -> dict[str, dict]:
    """Each serving target's summary (its files are in inputs[f"serving.{target}"] unless it was skipped)."""
    return {name.split(".", 1)[1]: upstream[name].get("summary") or {}
            for name in sorted(n for n in inputs if n.startswith("serving."))}


def _tools(steps: list[dict]) -> dict[str, str | None]:
    """The tool versions the steps recorded, merged (a later step's version of a tool wins), sorted by name."""
    tools_used: dict[str, str | None] = {}
    for step in steps:
        tools_used.update(step.get("tools") or {})
    return dict(sorted(tools_used.items()))


def _variants(inputs: dict[str, Path], selected: str) -> list[dict]:
    """One row per precision variant: size, parity, accuracy, latency, verdict, fallback."""
    rows = []
    names = sorted({k.split(".")[1] for k in inputs if k.startswith("variant.")}, key=lambda n: (n != "fp32", n))
    for name in names:
        if not all(f"variant.{name}.{part}" in inputs for part in ("onnx", "metrics", "verdicts")):
            continue  # a failed build stopped before this variant was measured and judged
        metrics = artifacts.metrics(inputs[f"variant.{name}.metrics"])
        verdicts = artifacts.verdicts(inputs[f"variant.{name}.verdicts"])
        folder = inputs[f"variant.{name}.onnx"]
        quantize = artifacts.quantize_record(folder) or {}
        tune = artifacts.tune_record(folder)
        tuned = tune["winner"] if tune is not None else {}
        first = next(iter(metrics["outputs"].values()))
        rows.append({
            "name": name,
            "kind": f"tuned: {tuned['candidate']}" if tuned else quantize.get("kind", "fp32"),
            "selected": name == selected,
            "bytes": artifacts.onnx_bytes(artifacts.onnx_model(folder)),
            "cosine": first.get("cosine"),
            "error_to_signal": first.get("error_to_signal"),
            "max_abs_error": first.get("max_abs_error"),
            "accuracy": (metrics.get("task") or {}).get("candidate"),
            "p50_ms": {b: t["onnxruntime"]["p50_ms"] for b, t in metrics["latency"].items()},
            "speedup": {b: t["speedup_p50"] for b, t in metrics["latency"].items()},
            "passed": verdicts["passed"],
            "reason": verdicts.get("reason"),
            "reduce_range": quantize.get("reduce_range"),
            "calibration_sha256": (quantize.get("calibration") or {}).get("sha256"),
            "before_fallback": quantize.get("before_fallback"),
            "fallback": quantize.get("fallback"),
        })
    return rows


def _plots(metrics: dict, source: dict, reference: dict, candidate: dict) -> dict[str, bytes]:
    images = {"latency": plots.latency(metrics, metrics.get("framework") or source["flavor"]),
              "layers": plots.layer_errors(metrics.get("localization"))}
    for name in candidate:
        if name in reference and reference[name].shape == candidate[name].shape:
            images[f"errors-{name}"] = plots.error_histogram(name, reference[name], candidate[name])
    return {name: png for name, png in images.items() if png}


def _readme(name: str, source: dict, spec: ModelSpec, serving: dict[str, dict]) -> str:
    lines = [
        f"# {name}: {source['uri']} as ONNX",
        "",
        "- `model.onnx`: the optimized model that passed the gates in `report.md`; a model too large for one",
        "  protobuf keeps its weights in `model.onnx.data` beside it (ONNX Runtime finds it: keep the two together).",
        "- `session_config.json`: the ONNX Runtime session settings it was validated with.",
        "- `targets/<target>/`: per hardware target, the tuned winner and the exact session settings it won with.",
        "- `sample_inputs.npz` / `sample_outputs.npz`: sample requests and the outputs to expect.",
        "- `manifest.json`: lineage, file hashes, tool versions, metrics and gate verdicts.",
        "- `report.html` (self-contained) / `report.md` + `plots/`: parity, latency, per-layer comparison, gates.",
        "",
        "Inputs: " + ", ".join(f"`{t.name}` {t.dtype} {t.shape}" for t in spec.inputs),
        "",
        "## ONNX Runtime, embedded",
        "",
        "```python",
        "import json, numpy as np, onnxruntime as ort",
        "cfg = json.load(open('session_config.json'))",
        "opts = ort.SessionOptions()",
        "opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg['session_options']['graph_optimization_level'])",
        "for key in ('intra_op_num_threads', 'inter_op_num_threads'):",
        "    setattr(opts, key, cfg['session_options'][key])",
        "opts.execution_mode = getattr(ort.ExecutionMode, cfg['session_options']['execution_mode'])",
        "sess = ort.InferenceSession(cfg['model'], opts, providers=cfg['providers'],",
        "                            provider_options=cfg['provider_options'])",
        "feeds = dict(np.load('sample_inputs.npz'))",
        "print(sess.run(None, feeds))  # compare with np.load('sample_outputs.npz')",
        "```",
        "",
    ]
    for target, summary in serving.items():
        if summary.get("skipped"):
            lines += [f"## {target}", "", f"Not generated: {summary['skipped']}", ""]
        else:
            lines += [summary.get("readme", f"## {target}\n\nSee `serving/{target}/`."), ""]
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def plan(graph) -> None:
    """The bundle of the candidate the recipe selects, with every serving target, variant and tuning record; the
    runner delivers it to the bundle's destination once built."""
    recipe = graph.recipe
    chosen = graph.candidates[recipe.select]
    inputs = {"model": "fetch", "data": "data", "onnx": chosen.model, "metrics": chosen.metrics,
              "verdicts": chosen.verdicts, "export": "export"}
    inputs.update({f"serving.{name.split('.', 1)[1]}": name for name in graph.names("serve.")})
    if recipe.variants:  # every candidate's measurements and verdicts, for the report's variant table
        for c in graph.candidates.values():
            inputs.update({f"variant.{c.name}.onnx": c.model, f"variant.{c.name}.metrics": c.metrics,
                           f"variant.{c.name}.verdicts": c.verdicts})
    inputs.update({name: name for name in graph.names("tune.")})
    graph.add("publish", {"recipe": recipe.model_dump(mode="json"), "recipe_sha256": graph.recipe_digest}, inputs,
              context={"source_uri": graph.source.uri}, deliver_to=graph.bundle_dest)
