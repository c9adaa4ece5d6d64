"""ONNX Runtime sessions as kiln makes them, in one place (validate, export checks, session configs)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def session(path: Path, threads: int | None = None, level: str = "disabled", providers: list[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def feeds_for(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays the session wants, cast to its declared input types."""
    wanted = {}
    for node in sess.get_inputs():
        array = feeds[node.name]
        dtype = ONNX_TO_NUMPY.get(node.type)
        wanted[node.name] = array.astype(dtype, copy=False) if dtype is not None else array
    return wanted


def run(sess, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return sess.run(None, feeds_for(sess, feeds))
