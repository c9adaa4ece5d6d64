"""A kiln bundle as an ONNX Runtime session, exactly as the bundle says to run it (`session_config.json`).

The one place that reads a bundle's runtime settings for the benchmarks: when bundles carry per-target tuned
settings (hardware tuning), this function is the edit."""

from __future__ import annotations

import json
from pathlib import Path


def bundle_session(bundle: Path):
    import onnxruntime as ort

    config = json.loads((bundle / "session_config.json").read_text())
    settings = config["session_options"]
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings["graph_optimization_level"])
    options.intra_op_num_threads = settings["intra_op_num_threads"]
    options.inter_op_num_threads = settings["inter_op_num_threads"]
    options.execution_mode = getattr(ort.ExecutionMode, settings["execution_mode"])
    options.log_severity_level = 3
    return ort.InferenceSession(str(bundle / config["model"]), options, providers=config["providers"])
