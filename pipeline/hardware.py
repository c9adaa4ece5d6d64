"""Hardware targets as data: what "tune for cuda" means, in one table a recipe can extend or override.

A profile names an ONNX Runtime execution provider, the alternative provider-option sets worth measuring, the
precisions worth building for it and the session settings to search. Nothing here decides what is fast: the
tune stage measures every candidate the profile allows and keeps the fastest that passes the parity gates.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PrecisionKind = Literal["fp32", "fp16", "int8-dynamic", "int8-static", "weight-only"]
GraphLevel = Literal["disabled", "basic", "extended", "all"]


class TargetProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    provider: str = Field(description="ONNX Runtime execution provider, e.g. CUDAExecutionProvider")
    provider_options: list[dict[str, Any]] = Field(
        default_factory=lambda: [{}], min_length=1, description="Alternative option sets, each measured"
    )
    precisions: list[PrecisionKind] = Field(
        default_factory=lambda: ["fp32"], min_length=1, description="Precision kinds worth building for this target"
    )
    threads: list[int] | None = Field(
        None, description="Intra-op thread counts to try; default: all cores and half of them"
    )
    execution_modes: list[Literal["sequential", "parallel"]] = Field(default_factory=lambda: ["sequential", "parallel"])
    graph_levels: list[GraphLevel] = Field(
        default_factory=lambda: ["disabled", "all"],
        description="Session graph optimization level on top of the offline-optimized model",
    )
    io_binding: list[bool] = Field(default_factory=lambda: [False, True], description="Bind inputs/outputs once")
    fixed_shapes: bool = Field(
        False, description="One session per batch size (needed by CUDA graphs and TensorRT engines)"
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="What a worker needs to tune this target (a distributed executor's hint)"
    )


BUILTIN: dict[str, TargetProfile] = {
    "cpu": TargetProfile(
        description="Any x86/ARM CPU. INT8 reduce_range follows the CPU's ISA (no VNNI: reduced range).",
        provider="CPUExecutionProvider",
        provider_options=[{}],
        precisions=["fp32", "int8-dynamic", "int8-static"],
    ),
    "cuda": TargetProfile(
        description="NVIDIA GPU through the CUDA provider (onnxruntime-gpu).",
        provider="CUDAExecutionProvider",
        provider_options=[
            {"cudnn_conv_algo_search": "EXHAUSTIVE"},
            {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "1"},
            {"cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "1"},
        ],
        precisions=["fp32", "fp16"],
        threads=[1],
        execution_modes=["sequential"],
        graph_levels=["disabled", "all"],
        io_binding=[True],
        fixed_shapes=True,
        resources={"num_gpus": 1, "target:cuda": 1},
    ),
    "tensorrt": TargetProfile(
        description="NVIDIA GPU through TensorRT (engine built per shape, cached).",
        provider="TensorrtExecutionProvider",
        provider_options=[
            {"trt_fp16_enable": "1", "trt_max_workspace_size": str(4 << 30), "trt_engine_cache_enable": "1"},
            {"trt_fp16_enable": "0", "trt_max_workspace_size": str(4 << 30), "trt_engine_cache_enable": "1"},
        ],
        precisions=["fp32"],
        threads=[1],
        execution_modes=["sequential"],
        graph_levels=["disabled"],
        io_binding=[True],
        fixed_shapes=True,
        resources={"num_gpus": 1, "target:tensorrt": 1},
    ),
    "openvino": TargetProfile(
        description="Intel CPU through the OpenVINO provider (onnxruntime-openvino).",
        provider="OpenVINOExecutionProvider",
        provider_options=[{"device_type": "CPU", "precision": "FP32"}],
        precisions=["fp32", "int8-static"],
        execution_modes=["sequential"],
        graph_levels=["disabled"],
        io_binding=[False],
        resources={"target:openvino": 1},
    ),
}


def resolve(name: str, overrides: dict[str, TargetProfile]) -> TargetProfile:
    """The recipe's own profile of that name, else the built-in one."""
    if name in overrides:
        return overrides[name]
    return BUILTIN[name]
