"""ONNX Runtime sessions as kiln makes them, in one place (validate, export checks, tuning, session configs).

Session *settings* are one JSON-able dict, the same one the bundle's session_config.json holds, so what was
measured is exactly what a serving team loads:

    {"providers": [...], "provider_options": [{...}, ...],          # as InferenceSession takes them
     "session_options": {"graph_optimization_level": "ORT_...", "intra_op_num_threads": n,
                         "inter_op_num_threads": n, "execution_mode": "ORT_SEQUENTIAL"|"ORT_PARALLEL"},
     "io_binding": bool,      # inputs copied to the device once, outputs left there
     "fixed_shapes": bool}    # one session per input shape (CUDA graphs, TensorRT engines)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stages import artifacts

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


MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def default_settings(threads: int | None = None) -> dict:
    """What kiln validates with when nothing was tuned: the CPU provider, the offline-optimized graph as is."""
    return settings("CPUExecutionProvider", {}, threads or os.cpu_count() or 1, "sequential", "disabled", False, False)


def settings(provider: str, provider_options: dict, threads: int, mode: str, level: str, io_binding: bool,
             fixed_shapes: bool) -> dict:
    providers, options = [provider], [dict(provider_options)]
    if provider != "CPUExecutionProvider":  # nodes the provider cannot run fall back to the CPU
        providers.append("CPUExecutionProvider")
        options.append({})
    return {
        "providers": providers,
        "provider_options": options,
        "session_options": {
            "graph_optimization_level": LEVELS[level],
            "intra_op_num_threads": threads,
            "inter_op_num_threads": threads if mode == "parallel" else 1,
            "execution_mode": MODES[mode],
        },
        "io_binding": io_binding,
        "fixed_shapes": fixed_shapes,
    }


def session_from(path: Path, config: dict):
    """An InferenceSession exactly as the settings say."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    chosen = config["session_options"]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, chosen["graph_optimization_level"])
    options.intra_op_num_threads = chosen["intra_op_num_threads"]
    options.inter_op_num_threads = chosen["inter_op_num_threads"]
    options.execution_mode = getattr(ort.ExecutionMode, chosen["execution_mode"])
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=config["providers"],
                                provider_options=config["provider_options"])


def optimize_offline(source: Path, target: Path, level: str, providers: list[str] | None = None,
                     provider_options: list[dict] | None = None) -> None:
    """ONNX Runtime's offline graph optimization: load `source` at `level` (a key of LEVELS) and save the graph
    the session optimized to `target`, in kiln's layout (external data in `<target>.data` for a large model).
    On the CPU provider unless `providers` say otherwise."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    artifacts.data_file(target).unlink(missing_ok=True)
    if artifacts.has_external_data(source) or artifacts.onnx_bytes(source) > artifacts.external_data_bytes():
        # ONNX Runtime cannot save a graph over protobuf's 2 GiB inline: the initializers go beside it. And
        # told nothing, it keeps initializers read from external data as references to the *source's* data
        # file, which the target's folder does not have; settle_onnx inlines a small result afterwards.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         artifacts.data_file(target).name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(artifacts.EXTERNAL_TENSOR_BYTES))
    ort.InferenceSession(str(source), options, providers=providers or ["CPUExecutionProvider"],
                         provider_options=provider_options)
    artifacts.settle_onnx(target)


def bake(path: Path, config: dict, target: Path) -> dict:
    """Save the graph as the settings' online optimization leaves it, and return settings that load it as is
    (ORT_DISABLE_ALL): every consumer of the bundle, whatever its own default level, then runs the same graph."""
    level = next(k for k, v in LEVELS.items() if v == config["session_options"]["graph_optimization_level"])
    optimize_offline(path, target, level, config["providers"], config["provider_options"])
    return {**config, "session_options": {**config["session_options"], "graph_optimization_level": LEVELS["disabled"]}}


class Runner:
    """Runs one model file with one settings dict. Sessions are made lazily: one in all, or one per input
    shape when the settings fix shapes (a CUDA graph or TensorRT engine is captured for a single shape)."""

    def __init__(self, path: Path, config: dict):
        self.path, self.config = path, config
        self._sessions: dict = {}
        # A CUDA graph replays fixed device addresses, so only bound, unchanging buffers may feed it; outputs
        # for parity (new inputs every call) come from the same kernels captured-free.
        self._plain = {**config, "provider_options": [{k: v for k, v in o.items() if k != "enable_cuda_graph"}
                                                      for o in config["provider_options"]]}

    def session(self, feeds: dict[str, np.ndarray] | None = None, config: dict | None = None):
        config = config or self.config
        shape = tuple(sorted((k, v.shape) for k, v in feeds.items())) if config["fixed_shapes"] and feeds else None
        key = (shape, config is self._plain)
        if key not in self._sessions:
            self._sessions[key] = session_from(self.path, config)
        return self._sessions[key]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run(self.session(feeds, self._plain), feeds)

    def call(self, feeds: dict[str, np.ndarray]):
        """A zero-argument call for the latency harness, with the inputs prepared once."""
        sess = self.session(feeds)
        wanted = feeds_for(sess, feeds)
        if not self.config["io_binding"]:
            return lambda: sess.run(None, wanted)
        import onnxruntime as ort

        device = DEVICES.get(self.config["providers"][0], "cpu")
        binding = sess.io_binding()
        for name, array in wanted.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
        for output in sess.get_outputs():
            binding.bind_output(output.name, device)
        sess.run_with_iobinding(binding)
        # Keep the buffers the first run allocated: every later run writes to the same addresses.
        for output, value in zip(sess.get_outputs(), binding.get_outputs()):
            binding.bind_ortvalue_output(output.name, value)

        def call():
            sess.run_with_iobinding(binding)

        return call
