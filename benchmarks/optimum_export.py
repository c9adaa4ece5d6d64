"""Optimum's path for one model, run with .venv-optimum's Python (Optimum wants transformers 4.57, which cannot
share .venv): ONNX export of a local Hugging Face checkpoint folder, ORT graph optimization (O2), dynamic INT8
quantization (AVX2 preset). Prints one JSON line: the .onnx to time (the O2 model, with `quantize_error`, when
quantization fails), the seconds each step took, versions; or {"error": "..."} with the first line of what failed.
Offline: local folders only.

    .venv-optimum/bin/python benchmarks/optimum_export.py MODEL_DIR OUT_DIR [--task feature-extraction]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--task", default="feature-extraction")
    args = parser.parse_args()
    os.environ.update({"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "TRANSFORMERS_OFFLINE": "1"})
    seconds: dict[str, float] = {}
    step = "import"
    try:
        started = time.perf_counter()
        from importlib.metadata import version

        from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer, ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig, OptimizationConfig

        seconds[step] = time.perf_counter() - started
        result: dict = {}
        for step in ("export", "optimize", "quantize"):
            started = time.perf_counter()
            if step == "quantize":
                try:
                    optimized = args.out / "optimized"
                    quantizer = ORTQuantizer.from_pretrained(str(optimized), file_name=_onnx_in(optimized).name)
                    quantizer.quantize(save_dir=str(args.out / "quantized"), quantization_config=AutoQuantizationConfig
                                       .avx2(is_static=False, per_channel=False))
                    result["onnx"] = str(_onnx_in(args.out / "quantized"))
                except Exception as exc:  # noqa: BLE001 - the O2 model is still Optimum's result; say why
                    result["onnx"] = str(_onnx_in(args.out / "optimized"))
                    result["quantize_error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            elif step == "export":
                model = ORTModelForFeatureExtraction.from_pretrained(str(args.model_dir), export=True)
                model.save_pretrained(str(args.out / "export"))
            elif step == "optimize":
                optimizer = ORTOptimizer.from_pretrained(model)
                optimizer.optimize(save_dir=str(args.out / "optimized"),
                                   optimization_config=OptimizationConfig(optimization_level=2))
            seconds[step] = time.perf_counter() - started
        result.update(seconds=seconds,
                      versions={d: version(d) for d in ("optimum", "optimum-onnx", "transformers", "onnxruntime")})
    except Exception as exc:  # noqa: BLE001 - reported as this tool's failure on this model
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        result = {"error": f"Optimum {step}: {type(exc).__name__}: {first}", "seconds": seconds}
    print(json.dumps(result))


def _onnx_in(folder: Path) -> Path:
    found = sorted(folder.glob("*.onnx"))
    if not found:
        raise FileNotFoundError(f"no .onnx written in {folder}")
    return found[0]


if __name__ == "__main__":
    main()
