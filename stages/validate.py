"""validate: run the ORIGINAL framework model and the ONNX candidate on the same inputs in one process, and
measure: parity per output (errors, cosine, top-1/top-k agreement, NaN/Inf; accuracy and F1 when labels exist),
parity again at other sizes of every dynamic axis, the layer-by-layer comparison against the exported graph on
the worst samples, and latency of both at each batch size. It measures only; the gate stage judges, so changing
a threshold does not re-measure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from pipeline import progress
from pipeline.errors import ModelError
from pipeline.schema import StageConfig, Strict
from pipeline.versions import onnxruntime_distribution
from stages import artifacts, frameworks, latency, localize, machine, parity
from stages.tensors import CHUNK, ModelSpec, axis_sizes, batch_of, chunked_outputs, resize_axes

VERSION = 10


class Latency(Strict):
    batch_sizes: list[Annotated[int, Field(ge=1, le=100_000)]] = Field(default_factory=lambda: [1], min_length=1)
    warmup: int = Field(2, ge=1, le=100_000, description="Untimed calls per runtime before its first block")
    iterations: int = Field(
        10, ge=5, le=1_000_000, description="Fewest timed runs per batch size and runtime (a slow call: min_seconds "
        "of runs, at least 5); more until target_ci is met")
    min_seconds: float = Field(2.0, ge=0, le=3600, description="A slow call's minimum: this much timed work")
    threads: int | None = Field(None, ge=1, le=1024, description="Intra-op threads for both runtimes; default: all cores")
    target_ci: float | None = Field(
        0.05, gt=0, description="Keep measuring until each p50's 95 % CI half-width is within this fraction of it "
        "(and each p95's, where gates.latency.max_p95_ms is set); null: exactly `iterations` runs"
    )
    max_iterations: int = Field(2000, ge=5, description="Cap on timed runs per runtime and batch size")
    time_budget_s: float = Field(10.0, gt=0, description="Cap on measuring time per batch size (every runtime)")


class Localize(Strict):
    enabled: bool = Field(True, description="Compare the original's layers with the exported graph's tensors")
    samples: int = Field(4, ge=1, description="How many samples (those with the largest output error)")
    tolerance: float = Field(1e-3, gt=0, description="Relative error (max |err| / max |ref|) that counts as divergent")


class Config(StageConfig):
    latency: Latency
    precise_p95: bool = Field(False, description="A gate reads the p95: measure until it too is known to target_ci")
    shape_sweep: bool
    localize: Localize
    source_options: dict[str, str] = Field(description="How the original model is called (frameworks' load)")


INPUTS = {"model": artifacts.SOURCE, "data": artifacts.SAMPLES, "onnx": artifacts.ONNX, "exported": artifacts.ONNX,
          "session": artifacts.ONNX}
OUTPUT = artifacts.METRICS


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return ["numpy", "onnx", onnxruntime_distribution(), *frameworks.tools(frameworks.flavor_of(inputs))]


def _sweep_sizes(spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[dict[str, int]]:
    """Size 1 and half size of every dynamic axis (the full size is the main comparison)."""
    full = axis_sizes(spec, feeds)
    tried = []
    for sizes in ({n: 1 for n in full}, {n: max(1, s // 2) for n, s in full.items()}):
        if sizes != full and sizes not in tried:
            tried.append(sizes)
    return tried


def _localization_rows(spec: ModelSpec, reference: np.ndarray, candidate: np.ndarray, count: int) -> np.ndarray:
    """The samples where the outputs differ most, led by the first sample of the chunk they were validated in:
    a model whose behaviour depends on its batch (e.g. control flow on the first row) then takes the same path."""
    error = parity.per_sample_error(reference, candidate)
    start = int(np.argmax(error)) // CHUNK * CHUNK
    chunk = np.arange(start, min(start + CHUNK, error.size))
    ranked = [int(r) for r in chunk[np.argsort(-error[chunk], kind="stable")] if r != start]
    return np.array([start, *sorted(ranked[: count - 1])])


def _shape_sweep(framework, model, spec: ModelSpec, feeds: dict[str, np.ndarray], runner,
                 names: list[str]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Parity at other sizes of every dynamic axis, and the outputs compared ('<trial>/reference/<output>',
    '<trial>/candidate/<output>') for the gate's tolerance checks."""
    sweep, arrays = [], {}
    progress.update("comparing at other axis sizes")
    for index, sizes in enumerate(_sweep_sizes(spec, feeds)):
        trial = resize_axes(spec, feeds, sizes)
        ref = framework.predict(model, spec, trial)
        cand = runner.run(trial)
        sweep.append({"sizes": sizes, "outputs": {n: parity.compare(r, c) for n, r, c in zip(names, ref, cand)}})
        arrays.update({f"{index}/reference/{n}": r for n, r in zip(names, ref)})
        arrays.update({f"{index}/candidate/{n}": c for n, c in zip(names, cand)})
    return sweep, arrays


def _task(labels: np.ndarray, names: list[str], reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """Top-1 accuracy and macro F1 of both models on the labelled samples (first output)."""
    task = {
        "metric": "top1_accuracy",
        "output": names[0],
        "samples": int(labels.shape[0]),
        "reference": parity.accuracy(reference[0], labels),
        "candidate": parity.accuracy(candidate[0], labels),
        "reference_f1": parity.macro_f1(reference[0], labels),
        "candidate_f1": parity.macro_f1(candidate[0], labels),
    }
    task["drop"] = task["reference"] - task["candidate"]
    return task


def _task_parity(framework, model, spec: ModelSpec, feeds: dict[str, np.ndarray], names: list[str],
                 reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict | None:
    """Agreement at the task's level (e.g. a text classifier's labels) from the framework's optional
    `task_parity`, which knows what the outputs mean; None when it has none."""
    hook = getattr(framework, "task_parity", None)
    if hook is None:
        return None
    return hook(model, spec, feeds, dict(zip(names, reference)), dict(zip(names, candidate)))


def _localization(settings: Localize, framework, model, spec: ModelSpec, feeds: dict[str, np.ndarray],
                  reference: list[np.ndarray], candidate: list[np.ndarray], exported: Path) -> dict:
    """The layer-by-layer comparison against the exported graph, on the samples that differ most."""
    progress.update("comparing layer by layer")
    subset = {k: v[_localization_rows(spec, reference[0], candidate[0], settings.samples)]
              for k, v in feeds.items()} if spec.batch_axis_named else feeds
    return localize.localize(framework, model, spec, subset, exported, settings.tolerance)


def _latency(settings: Latency, precise_p95: bool, framework, model, spec: ModelSpec, feeds: dict[str, np.ndarray],
             runner) -> dict:
    """Latency of the original and the ONNX model at each batch size, with this step alone on the machine."""
    timings = {}
    with latency.exclusive():
        for batch in settings.batch_sizes:
            batch_feeds = batch_of(spec, feeds, batch)
            measured = latency.measure(
                {
                    "original": framework.runner(model, spec, batch_feeds),
                    "onnxruntime": runner.call(batch_feeds),
                },
                batch=batch,
                warmup=settings.warmup,
                min_iterations=settings.iterations,
                min_seconds=settings.min_seconds,
                target_ci=settings.target_ci,
                p95=precise_p95,
                max_iterations=settings.max_iterations if settings.target_ci is not None else settings.iterations,
                time_budget_s=settings.time_budget_s if settings.target_ci is not None else None,
                say=progress.update,
            )
            measured["speedup_p50"] = measured["original"]["p50_ms"] / measured["onnxruntime"]["p50_ms"]
            timings[str(batch)] = measured
    return timings


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    from stages import onnx_runtime

    settings = config.latency
    threads = settings.threads or os.cpu_count() or 1
    source = artifacts.source(inputs["model"])
    flavor = source["flavor"]
    frameworks.framework(flavor).set_threads(threads)  # before loading: TensorFlow fixes its pools at start
    framework, model = frameworks.load_source(source, artifacts.model_dir(inputs["model"]), config.source_options,
                                              context.get("allow_pickle", False))
    spec = artifacts.spec(inputs["data"])
    feeds = artifacts.inputs(inputs["data"])
    labels = artifacts.labels(inputs["data"])

    # The tuned settings when a tune step chose them, else the defaults; recorded, and published as is.
    session = (artifacts.session_config(inputs["session"]) if "session" in inputs
               else onnx_runtime.default_settings(threads))
    runner = onnx_runtime.Runner(artifacts.onnx_model(inputs["onnx"]), session)
    names = [o.name for o in runner.session(feeds).get_outputs()]

    samples = int(next(iter(feeds.values())).shape[0])
    progress.update(f"comparing {samples} samples: original and ONNX Runtime")
    reference = chunked_outputs(lambda f: framework.predict(model, spec, f), spec, feeds)
    candidate = chunked_outputs(runner.run, spec, feeds)
    if len(reference) != len(candidate):
        raise ModelError(f"the ONNX model has {len(candidate)} outputs, the original model returns {len(reference)}")
    artifacts.write_outputs(out, dict(zip(names, reference)), dict(zip(names, candidate)))
    outputs = {name: parity.compare(r, c) for name, r, c in zip(names, reference, candidate)}

    sweep, sweep_arrays = ([], {}) if not config.shape_sweep else _shape_sweep(framework, model, spec, feeds,
                                                                                    runner, names)
    artifacts.write_sweep(out, sweep_arrays)
    task = _task(labels, names, reference, candidate) if labels is not None else None
    task_parity = _task_parity(framework, model, spec, feeds, names, reference, candidate)
    localization = (_localization(config.localize, framework, model, spec, feeds, reference, candidate,
                                  artifacts.onnx_model(inputs["exported"])) if config.localize.enabled else None)
    timings = _latency(settings, config.precise_p95, framework, model, spec, feeds, runner)

    metrics = {
        "framework": flavor,
        "threads": threads,
        "session": session,
        "machine": machine.describe(),
        "samples": samples,
        "outputs": outputs,
        "shape_sweep": sweep,
        "task": task,
        "task_parity": task_parity,
        "localization": localization,
        "latency": timings,
    }
    artifacts.write_metrics(out, metrics)
    first = (localization or {}).get("first_divergent")
    return {
        "parity": {n: {k: o.get(k) for k in ("max_abs_error", "cosine")} for n, o in outputs.items()},
        "accuracy": {k: task[k] for k in ("reference", "candidate")} if task else None,
        **({"task_parity": {task_parity["metric"]: task_parity["value"]}} if task_parity else {}),
        "first_divergent_layer": first["layer"] if first else None,
        "speedup_p50": {b: round(t["speedup_p50"], 3) for b, t in timings.items()},
    }


def config_for(graph) -> dict:
    """The validation settings every candidate is measured with."""
    validation = graph.recipe.validation
    return {"latency": validation.latency.model_dump(mode="json"),
            "precise_p95": graph.recipe.gates.latency.max_p95_ms is not None, "shape_sweep": validation.shape_sweep,
            "localize": validation.localize.model_dump(mode="json"),
            "source_options": graph.source_options}


def plan_candidate(graph, candidate) -> None:
    """Every candidate model is measured against the original, layer by layer against `candidate.exported`."""
    inputs = {"model": "fetch", "data": "data", "onnx": candidate.model, "exported": candidate.exported}
    if candidate.session:
        inputs["session"] = candidate.session
    candidate.metrics = graph.add(f"validate{candidate.suffix}", config_for(graph), inputs)
