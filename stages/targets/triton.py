"""triton: a Triton Inference Server model repository served by Triton's ONNX Runtime backend.

    serving/triton/
      <name>/config.pbtxt                 platform onnxruntime_onnx; I/O names, types and dims read from the graph
      <name>/<version>/model.onnx         the validated model (and model.onnx.data, its weights, when it is
                                          too large for one protobuf: ONNX Runtime finds it beside model.onnx)
      <name>/warmup/<sample>.<input>      raw tensors for model_warmup (Triton reads them at load)
      sample_request.json                 a KServe-V2 request for the first sample input

Everything Triton would otherwise guess (auto-complete) is written out, so the config loads the same with
`--disable-auto-complete-config`. Settings that contradict the graph are refused here, before publishing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import ConfigDict, Field, model_validator

from pipeline.errors import ModelError
from pipeline.schema import Strict
from pipeline.versions import onnxruntime_distribution
from stages import artifacts
from stages.targets import TargetContext, expected_output_lines


class Config(Strict):
    """ONNX Runtime inside Triton Inference Server: a model repository with config.pbtxt."""

    model_config = ConfigDict(extra="forbid", title="TritonTarget")

    max_batch_size: int = Field(32, ge=0, description="0 turns batching off; > 0 needs a dynamic first axis")
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="Each <= max_batch_size; default: none (Triton forms the largest batches)"
    )
    max_queue_delay_us: int | None = Field(
        None, ge=0, description="Default: gates.latency.max_p95_ms minus twice the measured p95 of the largest batch"
    )
    instance_count: int = Field(1, ge=1)
    instance_kind: Literal["cpu", "gpu"] = Field("cpu", description="instance_group kind (KIND_CPU / KIND_GPU)")
    accelerator: Literal["tensorrt", "openvino"] | None = Field(
        None, description="optimization.execution_accelerators: tensorrt (gpu instances) or openvino (cpu)"
    )
    precision_mode: Literal["FP32", "FP16", "INT8"] = Field("FP32", description="TensorRT precision_mode")
    outputs: list[str] | None = Field(None, description="Outputs to serve; default: every output of the ONNX graph")
    warmup: bool = Field(True, description="model_warmup from the validation samples")

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        too_big = [b for b in self.preferred_batch_sizes if b > self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes: {too_big[0]} is above max_batch_size ({self.max_batch_size})")
        if self.accelerator == "tensorrt" and self.instance_kind != "gpu":
            raise ValueError("accelerator tensorrt runs on GPU instances: set instance_kind: gpu")
        if self.accelerator == "openvino" and self.instance_kind != "cpu":
            raise ValueError("accelerator openvino runs on CPU instances: set instance_kind: cpu")
        return self


PLATFORM = "onnxruntime_onnx"
USES_BUNDLE_PATH = False  # the model repository is relative: config.pbtxt beside its version folder
SHOWN_VALUES = 8  # expected output values quoted in the README

# ONNX TensorProto element type -> (Triton data type, KServe-V2 datatype, numpy dtype). Strings and bfloat16
# are left out: kiln's sample data and warm-up files cannot represent them.
TYPES = {
    1: ("TYPE_FP32", "FP32", np.float32),
    2: ("TYPE_UINT8", "UINT8", np.uint8),
    3: ("TYPE_INT8", "INT8", np.int8),
    4: ("TYPE_UINT16", "UINT16", np.uint16),
    5: ("TYPE_INT16", "INT16", np.int16),
    6: ("TYPE_INT32", "INT32", np.int32),
    7: ("TYPE_INT64", "INT64", np.int64),
    9: ("TYPE_BOOL", "BOOL", np.bool_),
    10: ("TYPE_FP16", "FP16", np.float16),
    11: ("TYPE_FP64", "FP64", np.float64),
    12: ("TYPE_UINT32", "UINT32", np.uint32),
    13: ("TYPE_UINT64", "UINT64", np.uint64),
}


def tools(config, inputs: dict[str, Path]) -> list[str]:
    return ["onnx", "numpy", onnxruntime_distribution()]


def skip_reason(ctx: TargetContext) -> str | None:
    return None  # any ONNX model can be served by Triton's ONNX Runtime backend


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of the ONNX graph: name, ONNX element type, dims (-1 where not fixed) and axes (the
    graph's name for each dynamic axis, e.g. 'batch', 'seq'; None where fixed or unnamed)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}  # IR < 4 lists weights as inputs too

    def describe(value, kind: str) -> dict:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
            raise ModelError(f"{kind} '{value.name}' has no tensor shape in the ONNX graph; Triton needs its rank")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if tensor.elem_type not in TYPES:
            raise ModelError(f"{kind} '{value.name}' has ONNX element type {tensor.elem_type}, which Triton cannot serve")
        axes = [d.dim_param or None if not d.HasField("dim_value") else None for d in tensor.shape.dim]
        return {"name": value.name, "elem_type": tensor.elem_type, "dims": dims, "axes": axes}

    inputs = [describe(v, "input") for v in graph.input if v.name not in initializers]
    outputs = [describe(v, "output") for v in graph.output]
    return inputs, outputs


def check(config: dict, inputs: list[dict], outputs: list[dict]) -> list[dict]:
    """Refuse settings that contradict the graph; return the outputs to serve."""
    max_batch = config["max_batch_size"]
    too_big = [b for b in config.get("preferred_batch_sizes") or [] if b > max_batch]
    if too_big:
        raise ModelError(
            f"serving.triton.preferred_batch_sizes: {too_big[0]} is above serving.triton.max_batch_size ({max_batch})"
        )
    names = [o["name"] for o in outputs]
    wanted = config.get("outputs") or names
    for name in wanted:
        if name not in names:
            raise ModelError(
                f"serving.triton.outputs: '{name}' is not an output of the ONNX graph (has: {', '.join(names)})"
            )
    if max_batch > 0:
        for tensor, kind in [*((t, "input") for t in inputs), *((t, "output") for t in outputs)]:
            if not tensor["dims"] or tensor["dims"][0] != -1:
                fixed = tensor["dims"][0] if tensor["dims"] else "a scalar"
                raise ModelError(
                    f"serving.triton.max_batch_size is {max_batch} but {kind} '{tensor['name']}' has a fixed first "
                    f"axis ({fixed}) in the ONNX graph; set serving.triton.max_batch_size: 0 or export a dynamic batch axis"
                )
    return [o for o in outputs if o["name"] in wanted]


def queue_delay_us(config: dict, ctx: TargetContext) -> tuple[int, str]:
    """How long a request may wait for others to join its batch, and why.

    Worst case for a request: it waits the queue delay, then waits for the batch already running, then runs in
    the largest batch. So the delay is the latency budget (gates.latency.max_p95_ms; the tightest one when given
    per batch size) minus twice the p95 that validate measured at the largest batch size <= max_batch_size.
    Without a budget: 0, Triton's default (batches still form from requests that queue up while the instance is
    busy)."""
    if config.get("max_queue_delay_us") is not None:
        return config["max_queue_delay_us"], "serving.triton.max_queue_delay_us"
    budget = (ctx.latency_gates or {}).get("max_p95_ms")
    if budget is None:
        return 0, "no gates.latency.max_p95_ms: Triton's default"
    if isinstance(budget, dict):  # per batch size: the tightest one bounds every request
        budget = min(float(v) for v in budget.values())
    timings = ctx.metrics.get("latency", {})
    batches = sorted(int(b) for b in timings if int(b) <= max(config["max_batch_size"], 1))
    if not batches:
        return 0, "no latency measured at a batch size <= max_batch_size: Triton's default"
    run_ms = timings[str(batches[-1])]["onnxruntime"]["p95_ms"]
    delay = max(0, int((float(budget) - 2 * run_ms) * 1000))
    return delay, f"gates.latency.max_p95_ms {budget} ms - 2 x measured p95 {run_ms:.3f} ms at batch {batches[-1]}"


def _q(text: str) -> str:
    """A protobuf text-format string literal (JSON's escaping is a subset of it)."""
    return json.dumps(text, ensure_ascii=False)


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _io_block(kind: str, tensors: list[dict], batched: bool) -> list[str]:
    lines = [f"{kind} ["]
    for i, tensor in enumerate(tensors):
        dims = tensor["dims"][1:] if batched else tensor["dims"]
        lines += [
            "  {",
            f"    name: {_q(tensor['name'])}",
            f"    data_type: {TYPES[tensor['elem_type']][0]}",
            f"    dims: {_dims(dims)}",
            "  }" + ("," if i < len(tensors) - 1 else ""),
        ]
    return lines + ["]"]


def _warmup(ctx: TargetContext, inputs: list[dict], batched: bool, max_batch: int, folder: Path) -> tuple[list[str], int]:
    """model_warmup entries: the first validation sample at batch 1 and at the max batch, so that the first
    requests and the largest allocation both happen at load rather than on live traffic. Triton reads one
    batch-1 sample per input from <model>/warmup/<file> (raw little-endian bytes) and repeats it batch_size times."""
    folder.mkdir()
    settings = [("sample_0", 0, 1)]
    if batched and max_batch > 1:
        settings.append((f"sample_0_batch_{max_batch}", 0, max_batch))
    entries = []
    for name, index, batch_size in settings:
        inner = []
        for tensor in inputs:
            array = ctx.samples[tensor["name"]]
            sample = array[index] if batched else array
            dtype = np.dtype(TYPES[tensor["elem_type"]][2]).newbyteorder("<")
            file = f"sample_{index}." + re.sub(r"[^A-Za-z0-9_.-]", "_", tensor["name"])
            (folder / file).write_bytes(np.ascontiguousarray(sample, dtype=dtype).tobytes())
            inner += [
                "    inputs {",
                f"      key: {_q(tensor['name'])}",
                "      value {",
                f"        data_type: {TYPES[tensor['elem_type']][0]}",
                f"        dims: {_dims(list(sample.shape))}",
                f"        input_data_file: {_q(file)}",
                "      }",
                "    }",
            ]
        entries.append("\n".join(["  {", f"    name: {_q(name)}", f"    batch_size: {batch_size}", *inner, "  }"]))
    return ["model_warmup [", ",\n".join(entries), "]"], len(entries)


def _optimization_block(config: dict) -> list[str]:
    """The optimization block: graph level off (the model is optimized offline) and the execution accelerator."""
    lines = [
        "optimization {",
        "  # 2 = ORT_DISABLE_ALL: the model is already optimized offline; this is the level it was validated at.",
        "  graph { level: 2 }",
    ]
    accelerator = config.get("accelerator")
    if accelerator == "tensorrt":
        lines += [
            "  execution_accelerators {",
            "    gpu_execution_accelerator [",
            "      {",
            '        name: "tensorrt"',
            f'        parameters {{ key: "precision_mode" value: "{config.get("precision_mode") or "FP32"}" }}',
            "      }",
            "    ]",
            "  }",
        ]
    elif accelerator == "openvino":
        lines += ["  execution_accelerators {", '    cpu_execution_accelerator [ { name: "openvino" } ]', "  }"]
    return lines + ["}"]


def render_config(ctx: TargetContext, config: dict, inputs: list[dict], outputs: list[dict], model_dir: Path) -> tuple[str, dict]:
    max_batch = config["max_batch_size"]
    batched = max_batch > 0
    session = ctx.metrics["session"]["session_options"]
    lines = [
        f"# Triton model configuration generated by kiln for {ctx.source['uri']} (validated with ONNX Runtime).",
        f"name: {_q(ctx.name)}",
        f"platform: {_q(PLATFORM)}",
        f"max_batch_size: {max_batch}" + ("  # dims below exclude the batch axis" if batched else "  # no batching: dims are the full shape"),
        *_io_block("input", inputs, batched),
        *_io_block("output", outputs, batched),
    ]
    delay, delay_basis = queue_delay_us(config, ctx) if batched else (None, "no batching")
    if batched:
        preferred = config.get("preferred_batch_sizes") or []
        lines += [
            "dynamic_batching {",
            *([f"  preferred_batch_size: {_dims(preferred)}"] if preferred else []),
            f"  max_queue_delay_microseconds: {delay}  # {delay_basis}",
            "}",
        ]
    kind = "KIND_GPU" if config.get("instance_kind") == "gpu" else "KIND_CPU"
    lines += [
        "instance_group [",
        "  {",
        f"    kind: {kind}",
        f"    count: {config['instance_count']}",
        "  }",
        "]",
        *_optimization_block(config),
    ]
    parameters = {
        # The session settings validate measured with (session_config.json in the bundle).
        "intra_op_thread_count": str(session["intra_op_num_threads"]),
        "inter_op_thread_count": str(session["inter_op_num_threads"]),
        "execution_mode": "1" if session["execution_mode"] == "ORT_PARALLEL" else "0",  # 0 sequential, 1 parallel
    }
    for key, value in parameters.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    warmups = 0
    if config.get("warmup", True):
        warm, warmups = _warmup(ctx, inputs, batched, max_batch, model_dir / "warmup")
        lines += warm
    summary = {
        "max_batch_size": max_batch,
        "preferred_batch_sizes": config.get("preferred_batch_sizes") or [],
        "max_queue_delay_us": delay,
        "max_queue_delay_basis": delay_basis,
        "instance_group": {"kind": kind, "count": config["instance_count"]},
        "accelerator": config.get("accelerator"),
        "parameters": parameters,
        "warmup_samples": warmups,
    }
    return "\n".join(lines) + "\n", summary


def kserve_request(ctx: TargetContext, inputs: list[dict], outputs: list[dict], batched: bool) -> dict:
    """A KServe-V2 inference request for the first sample (JSON, row-major data)."""
    request = {"inputs": [], "outputs": [{"name": o["name"]} for o in outputs]}
    for tensor in inputs:
        array = ctx.samples[tensor["name"]]
        sample = array[:1] if batched else array
        request["inputs"].append(
            {
                "name": tensor["name"],
                "shape": list(sample.shape),
                "datatype": TYPES[tensor["elem_type"]][1],
                "data": sample.astype(TYPES[tensor["elem_type"]][2]).ravel().tolist(),
            }
        )
    return request


def build(ctx: TargetContext, config: dict, out: Path) -> dict:
    inputs, graph_outputs = graph_io(ctx.onnx)
    outputs = check(config, inputs, graph_outputs)
    batched = config["max_batch_size"] > 0
    version = ctx.version if ctx.version.isdigit() else "1"  # Triton versions are numeric folders
    model_dir = out / ctx.name
    (model_dir / version).mkdir(parents=True)
    artifacts.copy_onnx(ctx.onnx, model_dir / version / "model.onnx")
    text, summary = render_config(ctx, config, inputs, outputs, model_dir)
    (model_dir / "config.pbtxt").write_text(text)
    request = kserve_request(ctx, inputs, outputs, batched)
    (out / "sample_request.json").write_text(json.dumps(request))
    return {
        "repository": ".",
        "model": ctx.name,
        "version": int(version),
        "config": f"{ctx.name}/config.pbtxt",
        "platform": PLATFORM,
        "inputs": [{"name": t["name"], "dims": t["dims"], "type": TYPES[t["elem_type"]][0]} for t in inputs],
        "outputs": [{"name": t["name"], "dims": t["dims"], "type": TYPES[t["elem_type"]][0]} for t in outputs],
        **summary,
        "readme": _readme(ctx, version, outputs),
    }


def _readme(ctx: TargetContext, version: str, outputs: list[dict]) -> str:
    expected = expected_output_lines(ctx, [output["name"] for output in outputs], SHOWN_VALUES)
    files = " and ".join(f"`{ctx.name}/{version}/{path.name}`" for path in artifacts.onnx_files(ctx.onnx))
    return "\n".join(
        [
            "## Triton Inference Server (ONNX Runtime backend)",
            "",
            f"`serving/triton/` is a model repository: `{ctx.name}/config.pbtxt` and {files}.",
            "The config names every input and output as in the ONNX graph and carries the batching, instance, ONNX",
            "Runtime thread and warm-up settings; it loads as written (also with `--disable-auto-complete-config`).",
            "",
            "```bash",
            "docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 -v \"$PWD/serving/triton:/models:ro\" \\",
            "  nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models --disable-auto-complete-config",
            f"curl -s localhost:8000/v2/models/{ctx.name}/ready -w '%{{http_code}}\\n'   # 200 once loaded and warmed up",
            f"curl -s -X POST localhost:8000/v2/models/{ctx.name}/infer -H 'Content-Type: application/json' \\",
            "  -d @serving/triton/sample_request.json",
            "```",
            "",
            "`sample_request.json` is the first row of `sample_inputs.npz`; the response should match the first row of",
            "`sample_outputs.npz` within the parity tolerance in `report.md`:",
            "",
            *expected,
            "",
        ]
    )
