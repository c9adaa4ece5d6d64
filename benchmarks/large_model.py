"""A model over protobuf's 2 GiB limit through the whole pipeline: ONNX external data end to end.

    python benchmarks/large_model.py [--layers 8] [--hidden 8192] [--keep]

Builds an MLP of `layers` Linear(hidden, hidden) + ReLU layers with random weights (8 x 8192 x 8192 fp32: 2.15 GB,
He-initialized so activations neither vanish nor explode), logs it with mlflow.pytorch (pickle) in a temporary
sqlite registry under a temporary artifacts folder, and runs the real `kiln run` on two recipes for it: the fp32
bundle and the INT8 (dynamic, per-channel) bundle, which share every step but publish. Prints, per bundle, the
sizes of model.onnx and its data file; per step, its time and the model files it wrote; the peak RSS of the
largest kiln process; and the parity figures of each candidate against PyTorch. Nothing is written into the
repository; the temporary folder (≈ 20 GB at 8 layers) is removed unless --keep. Memory: the INT8 step's worker
peaked at 15.6 GB RSS with 9 layers (2.4 GB) and was killed on a 23 GB machine shared with other work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.settings import QUIET_ENV  # noqa: E402

NAME = "large-mlp"


def _register(home: Path, layers: int, hidden: int) -> tuple[str, float, int]:
    """The model logged and registered as models:/large-mlp/1; (tracking URI, seconds, fp32 weight bytes)."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    started = time.perf_counter()
    torch.manual_seed(0)
    parts = []
    for _ in range(layers):
        linear = torch.nn.Linear(hidden, hidden)
        torch.nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        torch.nn.init.zeros_(linear.bias)
        parts += [linear, torch.nn.ReLU()]
    model = torch.nn.Sequential(*parts[:-1]).eval()  # no ReLU after the last layer
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("large", artifact_location=(home / "mlruns").as_uri())
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, hidden), "x")]),
                               outputs=Schema([TensorSpec(np.dtype("float32"), (-1, hidden), "y")]))
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pytorch.log_model(model, name="model", signature=signature, serialization_format="pickle",
                                        pip_requirements=["torch"])
    mlflow.register_model(info.model_uri, NAME)
    return uri, time.perf_counter() - started, weights


def _recipes(folder: Path) -> list[Path]:
    base = {
        "name": NAME,
        "source": {"uri": f"models:/{NAME}/1"},
        "export": {"exporter": "dynamo", "opset": 18},
        "optimize": {"level": "extended"},
        "validation": {"data": {"source": "synthetic", "samples": 8, "seed": 0},
                       # a b1 call reads all 2.15 GB of weights: the budget, not the count, ends the timing
                       "latency": {"batch_sizes": [1], "warmup": 2, "iterations": 100, "time_budget_s": 20},
                       # localization would hold a third copy of the weights in the validate worker
                       "shape_sweep": False, "localize": {"enabled": False}},
        "gates": {"parity": {"default": {"atol": 1.0e-3, "rtol": 1.0e-3, "min_cosine": 0.9999}}},
        "variants": [{"name": "int8", "kind": "int8-dynamic", "per_channel": True,
                      "gates": {"default": {"min_cosine": 0.99, "atol": 10.0, "rtol": 1.0}},
                      "fallback": {"enabled": False}}],
        "serving": {"targets": []},
    }
    paths = []
    for name, select in ((NAME, "fp32"), (f"{NAME}-int8", "int8")):
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**base, "name": name, "select": select}, sort_keys=False))
        paths.append(path)
    return paths


def _kiln(recipes: Path, uri: str, artifacts: Path) -> tuple[dict, float, float]:
    """`kiln run --json` on the folder; (summary, seconds, peak RSS of the largest process in GiB)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--json", str(recipes), "--tracking-uri", uri,
                           "--artifacts", str(artifacts)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **QUIET_ENV, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"kiln run exited {done.returncode}")
    return json.loads(done.stdout), seconds, peak


def _size(count: int) -> str:
    return f"{count / 1e6:,.1f} MB" if count >= 10**5 else f"{count / 1e3:,.1f} kB"


def _files(out: Path) -> str:
    return ", ".join(f"{p.name} {_size(p.stat().st_size)}" for p in sorted(out.glob("*.onnx*"))) or "-"


def _report(summary: dict, artifacts: Path) -> None:
    for recipe in summary["recipes"]:
        bundle = Path(recipe["bundle"])
        manifest = json.loads((bundle / "manifest.json").read_text())
        data = manifest["model"].get("data_file")
        print(f"\n## bundle {recipe['recipe']} ({recipe['status']}): {bundle}")
        print(f"model.onnx {_size((bundle / 'model.onnx').stat().st_size)}; data file "
              + (f"{data} {_size((bundle / data).stat().st_size)}" if data else "none (self-contained)")
              + f"; manifest lists {', '.join(k for k in manifest['files'] if k.startswith('model.onnx'))}")
        for row in manifest["variants"]:
            p50 = row["p50_ms"].get("1")
            print(f"  {row['name']:5} {_size(row['bytes']):>10}  cosine {row['cosine']:.6f}  max|err| "
                  f"{row['max_abs_error']:.3g}  ORT p50 b1 {p50:.2f} ms  speedup vs torch {row['speedup'].get('1'):.2f}"
                  f"  gates {'pass' if row['passed'] else 'FAIL: ' + str(row['reason'])}")
    print("\n## steps (first recipe's chain; the second reused all but publish)")
    seen = set()
    for recipe in summary["recipes"]:
        for step in recipe["steps"]:
            if step["stage"] in seen and step["status"] == "cached":
                continue
            seen.add(step["stage"])
            out = artifacts / "store" / "steps" / step["key"][:2] / step["key"] / "out"
            print(f"  {step['step']:28} {step['status']:7} {step['seconds']:7.1f} s  {_files(out)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)  # 8 x 8192^2 fp32: 2.15 GB, just over 2 GiB
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (registry, store, bundles)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kiln-large-"))
    try:
        uri, register_s, weights = _register(work, args.layers, args.hidden)
        print(f"model: {args.layers} x Linear({args.hidden}, {args.hidden}), {weights:,} bytes fp32 "
              f"(protobuf's limit: {2**31:,}); logged + registered in {register_s:.0f} s")
        recipes = work / "recipes"
        recipes.mkdir()
        _recipes(recipes)
        summary, seconds, peak = _kiln(recipes, uri, work / "artifacts")
        print(f"kiln run: {seconds:.0f} s wall, peak RSS of the largest kiln process {peak:.1f} GiB, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        _report(summary, work / "artifacts")
    finally:
        if args.keep:
            print(f"\nkept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
