"""validate: run the ORIGINAL framework model and the ONNX candidate on the same inputs in one process, and
measure parity per output (errors, cosine, top-1 agreement, NaN/Inf, task accuracy when labels exist) and
latency of both at each batch size. It measures only; the gate stage judges, so changing a threshold does not
re-measure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.errors import ModelError
from pipeline.versions import onnxruntime_distribution
from stages import frameworks, latency, parity
from stages.export import _flavor
from stages.tensors import ModelSpec, batch_of, load_arrays, save_arrays

VERSION = 1
CHUNK = 64  # samples per call when computing parity outputs


def tools(config: dict, inputs: dict[str, Path]) -> list[str]:
    return ["numpy", onnxruntime_distribution(), *frameworks.tools(_flavor(inputs))]


def _chunks(spec: ModelSpec, feeds: dict[str, np.ndarray]):
    count = next(iter(feeds.values())).shape[0]
    if not spec.batch_axis_named:
        yield feeds
        return
    for start in range(0, count, CHUNK):
        yield {k: v[start : start + CHUNK] for k, v in feeds.items()}


def _outputs(run, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    parts = [run(chunk) for chunk in _chunks(spec, feeds)]
    return [np.concatenate(pieces, axis=0) if len(parts) > 1 else pieces[0] for pieces in zip(*parts)]


def run(config: dict, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    from stages import onnx_runtime

    settings = config["latency"]
    threads = settings["threads"] or os.cpu_count() or 1
    source = json.loads((inputs["model"] / "source.json").read_text())
    flavor = source["flavor"]
    frameworks.framework(flavor).set_threads(threads)  # before loading: TensorFlow fixes its pools at start
    framework, model = frameworks.load_source(source, inputs["model"] / "model", config["source_options"])
    spec = ModelSpec.load(inputs["data"] / "spec.json")
    feeds = load_arrays(inputs["data"] / "inputs.npz")
    labels_file = inputs["data"] / "labels.npz"
    labels = load_arrays(labels_file)["labels"] if labels_file.exists() else None

    sess = onnx_runtime.session(inputs["onnx"] / "model.onnx", threads=threads)
    names = [o.name for o in sess.get_outputs()]

    reference = _outputs(lambda f: framework.predict(model, spec, f), spec, feeds)
    candidate = _outputs(lambda f: onnx_runtime.run(sess, f), spec, feeds)
    if len(reference) != len(candidate):
        raise ModelError(f"the ONNX model has {len(candidate)} outputs, the original model returns {len(reference)}")
    save_arrays(out / "reference.npz", dict(zip(names, reference)))
    save_arrays(out / "candidate.npz", dict(zip(names, candidate)))
    outputs = {name: parity.compare(r, c) for name, r, c in zip(names, reference, candidate)}

    task = None
    if labels is not None:
        task = {
            "metric": "top1_accuracy",
            "output": names[0],
            "samples": int(labels.shape[0]),
            "reference": parity.accuracy(reference[0], labels),
            "candidate": parity.accuracy(candidate[0], labels),
        }
        task["drop"] = task["reference"] - task["candidate"]

    timings = {}
    for batch in settings["batch_sizes"]:
        batch_feeds = batch_of(spec, feeds, batch)
        ort_feeds = onnx_runtime.feeds_for(sess, batch_feeds)
        measured = latency.measure(
            {
                "original": framework.runner(model, spec, batch_feeds),
                "onnxruntime": lambda: sess.run(None, ort_feeds),
            },
            batch=batch,
            warmup=settings["warmup"],
            iterations=settings["iterations"],
        )
        measured["speedup_p50"] = measured["original"]["p50_ms"] / measured["onnxruntime"]["p50_ms"]
        timings[str(batch)] = measured

    metrics = {
        "framework": flavor,
        "threads": threads,
        "samples": int(next(iter(feeds.values())).shape[0]),
        "outputs": outputs,
        "task": task,
        "latency": timings,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {
        "parity": {n: {k: o.get(k) for k in ("max_abs_error", "cosine")} for n, o in outputs.items()},
        "accuracy": {k: task[k] for k in ("reference", "candidate")} if task else None,
        "speedup_p50": {b: round(t["speedup_p50"], 3) for b, t in timings.items()},
    }
