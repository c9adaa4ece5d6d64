"""A Python-based Triton backend named `onnxruntime`: the tests' stand-in for Triton's C++ ONNX Runtime backend.

The Triton core shipped in nvidia-pytriton has only the Python backend. Triton maps `platform: "onnxruntime_onnx"`
to the backend named `onnxruntime`, and a backend folder that holds a `model.py` instead of
`libtriton_onnxruntime.so` is run by the Python backend ("Python-based backends"). The test installs this file as
`<backends>/onnxruntime/model.py`, so the core loads kiln's config.pbtxt exactly as generated -- dynamic batching,
instance groups and model_warmup are the core's own -- and this file does what the C++ backend would do with it:
open `<model>/<version>/<default_model_filename>` with onnxruntime, apply the config's `parameters` and graph
level the way onnxruntime_backend reads them, and run each batch the core forms as one session call.

Not importable outside Triton (triton_python_backend_utils exists only in the backend's stub process).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# optimization.graph.level as onnxruntime_backend maps it (src/onnxruntime.cc); absent: ORT_ENABLE_ALL
GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        accelerators = config.get("optimization", {}).get("execution_accelerators", {})
        if any(accelerators.get(k) for k in ("cpu_execution_accelerator", "gpu_execution_accelerator")):
            raise pb_utils.TritonModelException("this stand-in runs the CPU provider only; no execution accelerators")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        level = config.get("optimization", {}).get("graph", {}).get("level")
        options.graph_optimization_level = GRAPH_LEVELS.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        mode = int(params.get("execution_mode", "0"))
        if mode not in (0, 1):
            raise pb_utils.TritonModelException(f"execution_mode must be 0 or 1, got {mode}")
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if mode else ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = int(params.get("intra_op_thread_count", "0"))
        options.inter_op_num_threads = int(params.get("inter_op_thread_count", "0"))
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.batched = config.get("max_batch_size", 0) > 0
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        pb_utils.Logger.log_info(
            "kiln-stand-in session: "
            + json.dumps(
                {
                    "model": path,
                    "intra_op_num_threads": options.intra_op_num_threads,
                    "inter_op_num_threads": options.inter_op_num_threads,
                    "execution_mode": str(options.execution_mode),
                    "graph_optimization_level": str(options.graph_optimization_level),
                }
            )
        )

    def execute(self, requests):
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        if self.batched and len(requests) > 1:
            # The dynamic batcher only groups requests whose non-batch shapes agree: one session run for all.
            sizes = [f[self.inputs[0]].shape[0] for f in feeds]
            joined = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
            results = self.session.run(self.outputs, joined)
            bounds = np.cumsum(sizes)[:-1]
            per_request = list(zip(*(np.split(r, bounds) for r in results)))
        else:
            per_request = [self.session.run(self.outputs, f) for f in feeds]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in zip(self.outputs, arrays)])
            for arrays in per_request
        ]
