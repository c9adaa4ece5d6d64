"""Is the tuner's winner really the fastest? The top three candidates of a tuned recipe's table (by the table's
objective) are each re-timed with their own best settings in a fresh process (kiln's harness, alone, at the
tune's batch sizes), `--repeats` times in rotating order; the winner should rank first or within 5 % of first.

    .venv/bin/python benchmarks/tuner_consistency.py recipes/tuned/bert-encoder-tuned.yaml [--artifacts artifacts]
        [--tracking-uri URI] [--repeats 3]

Runs `kiln run --json` on the recipe first (a no-op when it is built) to find the tune step and its candidates in
the store. benchmarks/minilm_build.py uses the same check on MiniLM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIME_ONE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from stages import onnx_runtime
from stages.latency import measure
from stages.tensors import batch_of, load_arrays, ModelSpec
job = json.loads(sys.argv[2])
spec, feeds = ModelSpec.load(Path(job["spec"])), load_arrays(Path(job["feeds"]))
runner = onnx_runtime.Runner(job["model"], job["settings"])
print(json.dumps({str(b): measure({"c": runner.call(batch_of(spec, feeds, b))}, batch=b)["c"]["p50_ms"]
                  for b in job["batches"]}))
"""


def consistency(summary: dict, store_root: Path, target: str = "cpu", repeats: int = 3) -> dict:
    """The tuned table's top three, each re-timed in fresh processes with its best settings."""
    from pipeline.store import Store
    from stages.tune import objective

    store = Store(store_root)
    entries = {}
    for step in summary["recipes"][0]["steps"]:
        entry = store.lookup(step["key"]) if step.get("key") else None
        if entry is not None:
            entries[entry.output_hash] = entry
    tune = next(e for e in entries.values() if e.meta["stage"] == f"tune.{target}")
    data = entries[tune.meta["inputs"]["data"]].out
    record = json.loads((tune.out / "tune.json").read_text())
    rows = sorted((r for r in record["candidates"] if r["objective"] is not None), key=lambda r: r["objective"])[:3]
    jobs = {}
    for row in rows:
        trials = [t for t in record["trials"] if t["candidate"] == row["candidate"] and t["objective"] is not None]
        best = min(trials, key=lambda t: t.get("final_objective", t["objective"]))
        model = entries[tune.meta["inputs"][f"cand.{row['candidate']}"]].out / "model.onnx"
        jobs[row["candidate"]] = {"model": str(model), "settings": best["settings"], "batches": record["batch_sizes"],
                                  "feeds": str(data / "inputs.npz"), "spec": str(data / "spec.json")}
    fresh: dict[str, list[float]] = {c: [] for c in jobs}
    names = list(jobs)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            done = subprocess.run([sys.executable, "-c", TIME_ONE, str(ROOT), json.dumps(jobs[name])],
                                  capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if done.returncode != 0:
                raise SystemExit(f"timing {name} in a fresh process failed: {done.stderr.strip()[-1500:]}")
            per_batch = {b: {"p50_ms": v} for b, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
            fresh[name].append(objective(per_batch, "p50"))
    medians = {c: float(np.median(v)) for c, v in fresh.items()}
    winner = record["winner"]["candidate"]
    lowest_in_table = min(r["objective"] for r in record["candidates"] if r["passed"] and r["objective"] is not None)
    return {"objective": record["objective"], "winner": winner, "winner_objective": record["winner"]["objective"],
            "winner_lowest_in_table": record["winner"]["objective"] <= lowest_in_table,
            "table": {r["candidate"]: r["objective"] for r in rows}, "fresh_p50_objective": medians,
            "fresh_runs": fresh,
            "winner_vs_first": medians[winner] / min(medians.values()) if winner in medians else None}


def show(found: dict) -> None:
    print(f"tuner consistency ({found['objective']} objective in the table; fresh processes, p50 objective):")
    print(f"  winner's objective is the lowest in its table: {found['winner_lowest_in_table']}")
    for cand, value in found["fresh_p50_objective"].items():
        mark = "  <- winner" if cand == found["winner"] else ""
        print(f"  {cand}: table {found['table'][cand]:.4g} ms, fresh {value:.4g} ms "
              f"{[round(v, 4) for v in found['fresh_runs'][cand]]}{mark}")
    ratio = found["winner_vs_first"]
    print(f"  winner / fastest in fresh processes: {ratio:.3f}" if ratio else "  the winner is not in the top three")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    command = [sys.executable, "-m", "pipeline", "run", str(args.recipe), "--json", "--artifacts", str(args.artifacts)]
    if args.tracking_uri:
        command += ["--tracking-uri", args.tracking_uri]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if not done.stdout.strip().startswith("{"):
        raise SystemExit(f"kiln run: exit {done.returncode}: {done.stderr.strip()[-1000:]}")
    show(consistency(json.loads(done.stdout), args.artifacts / "store", args.target, args.repeats))


if __name__ == "__main__":
    main()
