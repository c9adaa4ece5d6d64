"""How repeatable is kiln's latency harness on this machine? Runs the same measurement 5 times (the harness
validate uses: warm-up, interleaved rounds, adaptive iterations) for PyTorch eager and ONNX Runtime on two
models, and reports each run's p50, the spread of the p50s, and how many iterations each run needed.

    .venv/bin/python benchmarks/latency_spread.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _models():
    import torch

    from examples.models import BertEncoder, DigitsCNN

    torch.manual_seed(0)
    cnn = DigitsCNN().eval()
    bert = BertEncoder().eval()
    rng = np.random.default_rng(0)
    yield "digits-cnn b1", cnn, {"pixels": rng.random((1, 1, 8, 8), dtype=np.float32)}
    yield "digits-cnn b32", cnn, {"pixels": rng.random((32, 1, 8, 8), dtype=np.float32)}
    ids = rng.integers(0, 1000, (1, 64))
    yield "bert-encoder b1 s64", bert, {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def main() -> None:
    import onnxruntime as ort
    import torch

    from stages.latency import measure

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, feeds in _models():
            path = Path(tmp) / f"{name.split()[0]}.onnx"
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
            if not path.exists():
                torch.onnx.export(model, (), str(path), kwargs=tensors, dynamo=False, input_names=list(feeds),
                                  dynamic_axes={k: {0: "batch"} for k in feeds})
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

            def original():
                with torch.inference_mode():
                    return model(**tensors)

            runs = [measure({"torch": original, "onnxruntime": lambda: sess.run(None, feeds)}, batch=1, warmup=10,
                            iterations=100, target_ci=0.05, max_iterations=2000, time_budget_s=10)
                    for _ in range(args.repeats)]
            for runtime in ("torch", "onnxruntime"):
                p50 = np.array([r[runtime]["p50_ms"] for r in runs])
                iterations = [r[runtime]["iterations"] for r in runs]
                spread = (p50.max() - p50.min()) / np.median(p50)
                results[f"{name} {runtime}"] = {"p50_ms": p50.round(4).tolist(), "spread": round(float(spread), 4),
                                                "iterations": iterations}
                rows.append(f"| {name} | {runtime} | {' / '.join(f'{v:.3f}' for v in p50)} | {spread:.1%} | "
                            f"{' / '.join(map(str, iterations))} |")
    print("| model | runtime | p50 ms per run | spread (max-min)/median | iterations per run |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
