"""kiln side by side with the original framework and the peers, in one process run, on the same inputs, with the
same timing code (each tool in a warm block of its own per repeat, the order rotating between repeats):

  eager       torch eager (TensorFlow eager for the Keras model): the baseline every ratio is to
  compiled    torch.compile, CPU inductor (tf.function(jit_compile=True), XLA, for the Keras model)
  ort         ONNX Runtime with default settings on the plain export (kiln's export step: the recipe's exporter)
  olive       Olive (olive-ai) workflow with passes comparable to kiln's on the plain export, local, offline
  optimum     Optimum's ONNX export + O2 optimization + dynamic INT8 (in .venv-optimum; Hugging Face checkpoints)
  kiln        kiln's published bundle, built through the recipe path (sqlite MLflow registry, `kiln run`):
              the recipes tune for cpu and publish the winner (`select: tuned`), run with its own settings;
              their search space is what a user who knows the model family would write (benchmarks/zoo.py)

For each model: p50 / p95 at batch 1 and 32 as ratios to eager (per repeat, then median with min-max), parity of
every row vs the original on the same samples (mean per-sample cosine, max abs error, and on the part of the output
that varies between inputs: centered cosine and error / signal, beside the original's variation), artifact size, build
wall time, and kiln's warm re-run. A tool that fails on a model is a row with its one-line error. kiln vs the best
peer counts only peers at or above the model's parity bar (mean cosine); the others are named, not counted.

    .venv/bin/python benchmarks/compare.py [--models digits,bert,minilm,resnet50,mobilenetv2] [--repeats 2]
        [--quick] [--out benchmarks/results] [--optimum-python .venv-optimum/bin/python]

Writes compare.md, compare.json and compare.png under --out (git-ignored) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kiln_bundle import bundle_runner  # noqa: E402
from benchmarks.zoo import COMPARED, MODELS, SAMPLES, BenchModel, register  # noqa: E402

TOOLS = ["eager", "compiled", "ort", "olive", "optimum", "kiln"]
BATCHES = (1, SAMPLES)
ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "OLIVE_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "true",
       "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "TOKENIZERS_PARALLELISM": "false"}


class Tool:
    """One way of running the model: a call for given feeds, the first output as numpy, build time and size."""

    def __init__(self, name: str, label: str):
        self.name, self.label = name, label
        self.error: str | None = None
        self.build_s: float | None = None
        self.bytes: int | None = None
        self.call_for: Callable[[dict], Callable[[], object]] | None = None
        self.output: Callable[[dict], np.ndarray] | None = None
        self.notes: list[str] = []

    def fail(self, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {str(exc).strip()}"
        self.error = " ".join((text.splitlines() or [""])[0].split())[:300]


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    kiln = [line for line in lines if line.startswith("kiln:")]
    return (kiln or lines or ["(no output)"])[-1][:300]


def _ort_tool(tool: Tool, path: Path, pool: bool = False) -> None:
    """Time and read an ONNX model with ONNX Runtime's default session options."""
    import onnxruntime as ort

    from stages.onnx_runtime import feeds_for

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def prepared(feeds: dict) -> dict:
        full = dict(feeds)
        for name in names:  # Optimum's BERT exports also take token_type_ids
            if name not in full and name == "token_type_ids":
                full[name] = np.zeros_like(feeds["input_ids"])
        return feeds_for(sess, full)

    def output(feeds: dict) -> np.ndarray:
        result = sess.run(None, prepared(feeds))[0]
        if pool:  # feature-extraction output: mean pooling as the original does
            mask = feeds["attention_mask"][..., None].astype(result.dtype)
            result = (result * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
        return result

    def call_for(feeds: dict):
        ready = prepared(feeds)
        if pool:
            return lambda: output(feeds)
        return lambda: sess.run(None, ready)

    tool.call_for, tool.output = call_for, output
    tool.bytes = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.stem)) if path else None


def _framework_tools(bench: BenchModel, model, feeds: dict) -> tuple[Tool, Tool]:
    eager = Tool("eager", "TF eager" if bench.framework == "tensorflow" else "torch eager")
    compiled = Tool("compiled", "tf.function XLA" if bench.framework == "tensorflow" else "torch.compile")
    if bench.framework == "tensorflow":
        import tensorflow as tf

        def eager_call(f):
            tensors = [tf.constant(v) for v in f.values()]
            return lambda: model(tensors[0] if len(tensors) == 1 else tensors, training=False)

        xla = tf.function(lambda x: model(x, training=False), jit_compile=True)

        def compiled_call(f):
            tensor = tf.constant(next(iter(f.values())))
            return lambda: xla(tensor)

        weights = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    else:
        import torch

        def runner(module):
            def call_for(f):
                tensors = {k: torch.from_numpy(v) for k, v in f.items()}

                def call():
                    with torch.inference_mode():
                        return module(**tensors)

                return call

            return call_for

        eager_call = runner(model)
        compiled_call = runner(torch.compile(model))
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def as_numpy(call_for):
        def output(f):
            result = call_for(f)()
            return np.asarray(result.numpy() if hasattr(result, "numpy") else result)

        return output

    eager.call_for, eager.output, eager.build_s, eager.bytes = eager_call, as_numpy(eager_call), 0.0, weights
    compiled.call_for, compiled.output, compiled.bytes = compiled_call, as_numpy(compiled_call), weights
    started = time.perf_counter()
    try:  # compilation happens at the first call of each shape: that is this tool's build
        for batch in BATCHES:
            compiled.output({k: v[:batch] for k, v in feeds.items()})
        compiled.build_s = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001
        compiled.fail(exc)
    return eager, compiled


def _kiln(bench: BenchModel, model, feeds: dict, work: Path) -> tuple[Tool, dict]:
    """Register, write the recipe, `kiln run` twice (cold, warm) on a fresh store; the bundle's session."""
    import yaml

    tool = Tool("kiln", "kiln")
    info: dict = {}
    uri = f"sqlite:///{work / 'mlflow.db'}"
    register(bench, model, feeds, uri, work)
    np.savez(work / "samples.npz", **feeds)
    recipe = {"name": bench.name, "source": {"uri": f"models:/{bench.name}@champion", "allow_pickle": True}, **bench.recipe,
              "validation": {"data": {"source": "npz", "path": str(work / "samples.npz"), "samples": SAMPLES},
                             "latency": {"batch_sizes": [1], "warmup": 3, "iterations": 100, "target_ci": None},
                             "shape_sweep": False, "localize": {"enabled": False}},
              "serving": {"targets": []}}
    path = work / f"{bench.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "pipeline", "run", str(path), "--json", "--tracking-uri", uri,
               "--artifacts", str(work / "kiln")]
    env = {**os.environ, **ENV}
    summaries = []
    for attempt in ("cold", "warm"):
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        info[f"{attempt}_s"] = time.perf_counter() - started
        summary = json.loads(done.stdout) if done.stdout.strip().startswith("{") else None
        summaries.append(summary)
        if done.returncode != 0 or summary is None:
            tool.fail(f"kiln run exit {done.returncode}: {_first_line(done.stderr)}")
            break
    steps = {s["step"].split(":", 1)[1]: s for s in (summaries[0] or {"recipes": [{"steps": []}]})["recipes"][0]["steps"]}
    export = steps.get("export")
    if export and export.get("key"):
        from pipeline.store import Store

        entry = Store(work / "kiln" / "store").lookup(export["key"])
        if entry is not None:
            info["plain_export"] = entry.out / "model.onnx"
            info["export_s"] = float(entry.meta.get("seconds", 0.0))
    if tool.error is None:
        bundle = Path(summaries[0]["recipes"][0]["bundle"])
        runner = bundle_runner(bundle)
        tool.call_for, tool.output = runner.call, (lambda f: runner.run(f)[0])
        tool.bytes = (bundle / "model.onnx").stat().st_size
        tool.build_s = info["cold_s"]
        info["warm_rerun_s"] = info["warm_s"]
        info["warm_steps_ran"] = sum(1 for s in summaries[1]["recipes"][0]["steps"] if s["status"] == "ran")
        info["bundle"] = str(bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        info["selected"] = manifest["recipe"]["spec"].get("select", "fp32")
    return tool, info


def _olive(bench: BenchModel, plain: Path | None, export_s: float, feeds: dict, work: Path) -> Tool:
    tool = Tool("olive", "Olive")
    if plain is None:
        tool.fail("no plain export to start from (kiln's export step failed)")
        return tool
    from stages.olive import run_passes

    folder = work / "olive"
    folder.mkdir()
    started = time.perf_counter()
    try:
        result = run_passes(plain, bench.olive_passes, feeds, folder, field=f"{bench.name}.olive")
    except Exception as exc:  # noqa: BLE001
        tool.fail(exc)
        return tool
    tool.build_s = export_s + time.perf_counter() - started
    tool.notes.append("passes: " + " + ".join(p["type"] for p in bench.olive_passes))
    _ort_tool(tool, Path(result["model"]))
    return tool


def _optimum(bench: BenchModel, model, work: Path, python: Path) -> Tool:
    tool = Tool("optimum", "Optimum")
    if not python.exists():
        tool.fail(f"{python} not found: `make bench` creates .venv-optimum (Optimum cannot share .venv)")
        return tool
    folder = work / "checkpoint"
    folder.mkdir()
    if bench.hf_checkpoint:
        checkpoint = bench.hf_checkpoint(model, folder)
    elif bench.framework == "tensorflow":  # what a user has: the Keras file; Optimum will say what it wants
        model.save(str(folder / "model.keras"))
        checkpoint = folder
    else:
        import torch

        torch.save(model.state_dict(), folder / "model.pt")
        checkpoint = folder
    started = time.perf_counter()
    done = subprocess.run([str(python), str(ROOT / "benchmarks" / "optimum_export.py"), str(checkpoint),
                           str(work / "optimum")], capture_output=True, text=True, env={**os.environ, **ENV})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": f"exit {done.returncode}: {_first_line(done.stderr)}"}
    if "error" in result:
        tool.fail(result["error"])
        return tool
    tool.build_s = time.perf_counter() - started
    done_steps = "O2 only: dynamic INT8 failed: " + result["quantize_error"] if "quantize_error" in result else \
        "O2 + dynamic INT8 (avx2)"
    tool.notes.append(done_steps + "; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    _ort_tool(tool, Path(result["onnx"]), pool=bench.pooled)
    return tool


def _parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Mean per-sample cosine and max abs error, and kiln's centered measures: the original's variation between
    inputs, and the candidate's centered cosine and error / signal on that varying part."""
    from stages.parity import centered, mean_row_cosine

    if reference.shape != candidate.shape:
        raise ValueError(f"output shape {candidate.shape} differs from the original's {reference.shape}")
    flat_ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    flat = candidate.reshape(candidate.shape[0], -1).astype(np.float64)
    return {"mean_cosine": float(mean_row_cosine(flat_ref, flat)),
            "max_abs_error": float(np.abs(flat_ref - flat).max()), **centered(flat_ref, flat)}


def _timings(tools: list[Tool], feeds: dict, args) -> dict:
    """Per batch and repeat, each working tool runs in a warm block of its own: warm-up calls, then timed calls
    until its share of the budget is used (at least --min-iterations, at most 100). Blocks, not call-by-call
    interleaving: in one process, a runtime's first calls after another runtime's (a thread pool still
    spinning, caches full of the other's weights) are slower, and which tool came second decided the ratio.
    The order rotates every repeat so drift spreads evenly; ratios are taken within a repeat."""
    from stages.latency import exclusive, stats

    results: dict = {}
    for batch in BATCHES:
        batch_feeds = {k: v[:batch] for k, v in feeds.items()}
        calls, costs = {}, {}
        for tool in tools:
            if tool.error is None:
                try:
                    call = tool.call_for(batch_feeds)
                    call()
                    started = time.perf_counter()
                    call()
                    costs[tool.name], calls[tool.name] = time.perf_counter() - started, call
                except Exception as exc:  # noqa: BLE001
                    tool.fail(exc)
        counts = {name: int(min(100, max(args.min_iterations, args.budget / max(cost, 1e-6))))
                  for name, cost in costs.items()}
        names = list(calls)
        runs = []
        with exclusive():  # no kiln timing elsewhere on this machine meanwhile
            for repeat in range(args.repeats):
                order = names[repeat % len(names):] + names[: repeat % len(names)] if names else []
                run = {}
                for name in order:
                    # A call of half a second or more dwarfs the first-call slowdown (milliseconds): no warm-up.
                    for _ in range(args.warmup if costs[name] < 0.5 else 0):
                        calls[name]()
                    samples = []
                    for _ in range(counts[name]):
                        begin = time.perf_counter_ns()
                        calls[name]()
                        samples.append((time.perf_counter_ns() - begin) / 1e6)
                    run[name] = stats(samples, batch)
                runs.append(run)
        per_tool = {}
        for name in calls:
            p50 = np.array([r[name]["p50_ms"] for r in runs])
            p95 = np.array([r[name]["p95_ms"] for r in runs])
            speed50 = np.array([r["eager"]["p50_ms"] / r[name]["p50_ms"] for r in runs]) if "eager" in calls else None
            speed95 = np.array([r["eager"]["p95_ms"] / r[name]["p95_ms"] for r in runs]) if "eager" in calls else None
            per_tool[name] = {
                "p50_ms": float(np.median(p50)), "p50_range_ms": [float(p50.min()), float(p50.max())],
                "p95_ms": float(np.median(p95)), "p95_range_ms": [float(p95.min()), float(p95.max())],
                "speedup_p50": float(np.median(speed50)) if speed50 is not None else None,
                "speedup_p50_range": [float(speed50.min()), float(speed50.max())] if speed50 is not None else None,
                "speedup_p95": float(np.median(speed95)) if speed95 is not None else None,
                "iterations": [r[name]["iterations"] for r in runs],
            }
        results[str(batch)] = per_tool
    return results


def bench_model(key: str, args) -> dict:
    bench = MODELS[key]()
    with tempfile.TemporaryDirectory(prefix=f"kiln-bench-{key}-") as tmp:
        work = Path(tmp)
        model = bench.build()
        feeds = bench.feeds()
        eager, compiled = _framework_tools(bench, model, feeds)
        reference = eager.output(feeds)
        kiln, info = _kiln(bench, model, feeds, work)
        ort_tool = Tool("ort", "ORT default (plain export)")
        if info.get("plain_export"):
            _ort_tool(ort_tool, info["plain_export"])
            ort_tool.build_s = info.get("export_s")
        else:
            ort_tool.fail("no plain export (kiln's export step failed)")
        olive = _olive(bench, info.get("plain_export"), info.get("export_s", 0.0), feeds, work)
        optimum = _optimum(bench, model, work, args.optimum_python)
        tools = [eager, compiled, ort_tool, olive, optimum, kiln]
        parity = {}
        for tool in tools:
            if tool.error is None:
                try:
                    parity[tool.name] = _parity(reference, tool.output(feeds))
                except Exception as exc:  # noqa: BLE001
                    tool.fail(exc)
        timings = _timings(tools, feeds, args)
    rows = {}
    for tool in tools:
        rows[tool.name] = {
            "label": tool.label, "status": "failed" if tool.error else "ok", "error": tool.error,
            "build_s": tool.build_s, "bytes": tool.bytes, "parity": parity.get(tool.name), "notes": tool.notes,
            "latency": {b: timings[b].get(tool.name) for b in timings},
        }
    return {"model": bench.name, "framework": bench.framework, "min_cosine": bench.min_cosine,
            "variation": (parity.get("eager") or {}).get("variation"), "tools": rows,
            "kiln": {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}}


def best_peer(result: dict) -> dict:
    """Per batch: kiln vs the fastest other row that ran AND meets the model's parity bar (mean per-sample cosine
    vs the original), and vs the better of the framework's own eager and compiled runs: other p50 / kiln p50
    (> 1: kiln is faster). Rows below the bar are named, not counted: a faster wrong answer is no competitor."""
    out = {}
    tools, bar = result["tools"], result["min_cosine"]

    def fair(name: str) -> bool:
        return ((tools[name]["parity"] or {}).get("mean_cosine") or -1) >= bar

    for batch in map(str, BATCHES):
        kiln = (tools["kiln"]["latency"].get(batch) or {}).get("p50_ms")
        ran = [(row["latency"][batch]["p50_ms"], name) for name, row in tools.items()
               if name != "kiln" and row["status"] == "ok" and row["latency"].get(batch)]
        peers = [(p50, name) for p50, name in ran if fair(name)]
        framework = [(p50, name) for p50, name in ran if name in ("eager", "compiled")]
        if not kiln:
            continue
        out[batch] = {"below_bar": sorted(tools[name]["label"] for _, name in ran if not fair(name)),
                      "kiln_passes_bar": fair("kiln")}
        if peers:
            p50, name = min(peers)
            out[batch].update(peer=tools[name]["label"], ratio=p50 / kiln,
                              peer_cosine=(tools[name]["parity"] or {}).get("mean_cosine"))
        if framework:
            p50, name = min(framework)
            out[batch].update(framework=tools[name]["label"], framework_ratio=p50 / kiln)
    return out


def _fmt_latency(cell: dict | None) -> str:
    if not cell:
        return "–"
    speed = cell["speedup_p50"]
    low, high = cell["p50_range_ms"]
    ratio = f" ({speed:.2f}x)" if speed is not None else ""
    return f"{cell['p50_ms']:.3g}{ratio} [{low:.3g}–{high:.3g}] / {cell['p95_ms']:.3g}"


def _fmt_number(value: float | None, spec: str = ".3g") -> str:
    return "–" if value is None else f"{value:{spec}}"


def markdown(report: dict) -> str:
    lines = [f"# kiln vs frameworks and peers ({report['settings']['repeats']} repeat(s), medians; "
             f"[min–max of p50 over repeats]; ratios are eager p50 / tool p50 within each repeat)", "",
             f"Machine: {report['machine']}. " + " ".join(report["notes"]), ""]
    lines += ["## kiln vs the best peer at passing parity, and vs the better of eager and compiled "
              "(their p50 / kiln p50; > 1 means kiln is faster)", "",
              "| model | output variation | parity bar | b1: best peer | b1 ratio | b1 vs framework | b32: best peer "
              "| b32 ratio | b32 vs framework | below the bar | kiln build s | kiln warm re-run s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in report["results"]:
        peer = result["best_peer"]
        cells = [_fmt_number(result.get("variation")), f"{result['min_cosine']}"]
        for b in ("1", str(SAMPLES)):
            cell = peer.get(b, {})
            cells.append(f"{cell['peer']} | {cell['ratio']:.2f}x" if "ratio" in cell else "– | –")
            cells.append(f"{cell['framework_ratio']:.2f}x vs {cell['framework']}" if "framework_ratio" in cell else "–")
        below = sorted({name for b in peer.values() for name in b.get("below_bar", [])})
        if any(not b.get("kiln_passes_bar", True) for b in peer.values()):
            # kiln's own gate judged other samples or batches (dynamic INT8 depends on what is batched together)
            below.append(f"**kiln** ({result['tools']['kiln']['parity']['mean_cosine']:.4f} here)")
        cells.append(", ".join(below) or "–")
        kiln = result["kiln"]
        build = result["tools"]["kiln"]["build_s"]
        lines.append(f"| {result['model']} | {' | '.join(cells)} | {build:.1f} |" if build is not None else
                     f"| {result['model']} | {' | '.join(cells)} | failed |")
        lines[-1] += f" {kiln.get('warm_rerun_s', float('nan')):.1f} ({kiln.get('warm_steps_ran', '?')} steps ran) |"
    for result in report["results"]:
        lines += ["", f"## {result['model']} ({result['framework']})", "",
                  "| tool | status | build s | MB | mean cosine | centered cosine | error / signal | max abs err "
                  f"| b1 p50 ms (x eager) [range] / p95 | b{SAMPLES} p50 ms (x eager) [range] / p95 | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["tools"].values():
            parity = row["parity"] or {}
            status = "ok" if row["status"] == "ok" else f"**failed**: {row['error']}"
            lines.append(
                f"| {row['label']} | {status} | {row['build_s']:.1f} |".replace("| None |", "| – |")
                if row["build_s"] is not None else f"| {row['label']} | {status} | – |")
            lines[-1] += (f" {row['bytes'] / 2**20:.2f} |" if row["bytes"] else " – |")
            lines[-1] += (f" {parity['mean_cosine']:.6f} | {_fmt_number(parity.get('centered_cosine'), '.6f')} | "
                          f"{_fmt_number(parity.get('error_to_signal'))} | {parity['max_abs_error']:.3g} |"
                          if parity else " – | – | – | – |")
            lines[-1] += "".join(f" {_fmt_latency(row['latency'].get(b))} |" for b in ("1", str(SAMPLES)))
            lines[-1] += f" {'; '.join(row['notes'])} |"
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    figure, axes = plt.subplots(1, len(BATCHES), figsize=(6 * len(BATCHES), 4.5), sharey=True)
    width = 0.8 / len(TOOLS)
    for ax, batch in zip(np.atleast_1d(axes), map(str, BATCHES)):
        for index, tool in enumerate(TOOLS):
            heights, low, high = [], [], []
            for result in results:
                cell = result["tools"][tool]["latency"].get(batch) or {}
                speed = cell.get("speedup_p50") or 0.0
                spread = cell.get("speedup_p50_range") or [speed, speed]
                heights.append(speed)
                low.append(speed - spread[0])
                high.append(spread[1] - speed)
            positions = np.arange(len(results)) + index * width
            ax.bar(positions, heights, width, yerr=[low, high], label=tool, capsize=2)
            for x, h in zip(positions, heights):
                if h == 0:
                    ax.text(x, 0.02, "x", ha="center", color="red", transform=ax.get_xaxis_transform())
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(np.arange(len(results)) + 0.4 - width / 2)
        ax.set_xticklabels([r["model"] for r in results], rotation=15)
        ax.set_yscale("log")
        ax.set_title(f"batch {batch}: p50 speedup vs eager (x = failed)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(COMPARED), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of every tool per batch size")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed runs per tool, repeat and batch size")
    parser.add_argument("--min-iterations", type=int, default=3, help="timed runs per tool and repeat at the least")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each tool's block")
    parser.add_argument("--quick", action="store_true", help="harness check: 1 repeat, minimal timing")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--optimum-python", type=Path, default=ROOT / ".venv-optimum" / "bin" / "python")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.budget, args.min_iterations, args.warmup = 1, 0.2, 3, 1
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    os.environ.update(ENV)
    # torch.compile's build time is a cold compile, like a user's first: no inductor cache from an earlier run.
    inductor = tempfile.TemporaryDirectory(prefix="kiln-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor.name
    from stages.machine import describe

    machine = describe()
    report = {
        "machine": f"{machine['cpu']}, {machine['cores']} cores",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "notes": ["kiln's build time includes its validation (original vs ONNX parity and latency) and report;",
                  "Olive's and ORT's include the plain export (kiln's export step); Optimum's its own export;",
                  "torch.compile's is the first call at each batch size, from an empty inductor cache.",
                  "Noisy shared 2-core machine: compare ratios."],
        "seconds": 0.0,
        "results": [],
    }
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for key in keys:
        begun = time.perf_counter()
        result = bench_model(key, args)
        result["best_peer"] = best_peer(result)
        result["seconds"] = time.perf_counter() - begun
        report["results"].append(result)
        report["seconds"] = time.perf_counter() - started
        print(f"{key}: {result['seconds']:.0f} s", file=sys.stderr)
        # Written after every model, so a run cut short keeps what it measured.
        (args.out / "compare.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "compare.md").write_text(markdown(report))
    inductor.cleanup()
    plot(report, args.out / "compare.png")
    print(markdown(report))
    print(f"{report['seconds']:.0f} s; wrote {args.out / 'compare.md'}, compare.json, compare.png", file=sys.stderr)


if __name__ == "__main__":
    main()
