"""What this machine can run: ONNX Runtime providers, CPU instruction sets that decide INT8/FP16 speed, cores,
GPUs. Recorded in every tuning result (a measurement means little without the machine it was taken on) and
listed by `kiln targets`."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from functools import lru_cache

# /proc/cpuinfo flags that change which precisions pay off.
ISA_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_tile": "AMX",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
    "asimddp": "ARM dot product",
}


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in found.stdout.splitlines() if line.strip()] if found.returncode == 0 else []


def has_vnni() -> bool:
    """INT8 dot-product instructions: without them u8s8 products can saturate (use reduce_range)."""
    return any(f in _cpuinfo()[1] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


@lru_cache(maxsize=1)
def describe() -> dict:
    import onnxruntime as ort

    model, flags = _cpuinfo()
    isa = [name for flag, name in ISA_FLAGS.items() if flag in flags]
    return {
        "cpu": model,
        "cores": os.cpu_count() or 1,
        "isa": isa,
        "vnni": has_vnni(),
        "gpus": _gpus(),
        "providers": ort.get_available_providers(),
        "onnxruntime": ort.__version__,
        "machine": platform.machine(),
    }


def unavailable_reason(provider: str, machine: dict) -> str | None:
    """Why a provider cannot be tuned here, or None when it can."""
    if provider not in machine["providers"]:
        return (f"{provider} is not in this onnxruntime {machine['onnxruntime']} build "
                f"(available: {', '.join(machine['providers'])})")
    gpu_providers = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    if provider in gpu_providers and not machine["gpus"]:
        return f"{provider} is installed but this machine has no NVIDIA GPU (nvidia-smi finds none)"
    return None
