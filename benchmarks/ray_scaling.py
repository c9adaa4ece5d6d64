"""N recipes through `kiln run --executor ray` with 1 worker, then 2, on this machine: wall time and ratio.

    python benchmarks/ray_scaling.py [--recipes 4] [--workers 1 2] [--tracking-uri URI]

Each recipe is the digits CNN (serving targets off, batch size 1) with its own number of validation samples,
so every recipe has its own data/export/optimize/validate/gate/publish chain and only `fetch` is shared. Each
worker count builds into a fresh store and a fresh shared store URL; kiln starts a local Ray cluster with that
many CPUs (`--jobs`) and stops it after, and that start-up is in the wall time, as a user would see it.
Without --tracking-uri the example models are registered in a temporary sqlite registry first (not timed).
On 2 cores shared with other work, the ratio is what this machine gives, not what a cluster would.
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.settings import QUIET_ENV  # noqa: E402


def _recipes(folder: Path, count: int) -> Path:
    base = yaml.safe_load((ROOT / "recipes" / "digits-cnn.yaml").read_text())
    for i in range(count):
        recipe = json.loads(json.dumps(base))
        recipe["name"] = f"digits-{i}"
        recipe["serving"] = {"targets": []}
        recipe["validation"]["data"]["samples"] = 360 - i  # its own data, so its own chain of steps
        recipe["validation"]["latency"].update(batch_sizes=[1], iterations=100, time_budget_s=2)
        (folder / f"digits-{i}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder


def _register(home: Path) -> str:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    subprocess.run([sys.executable, "-m", "examples.register", "--tracking-uri", uri, "--artifacts", str(home)],
                   cwd=ROOT, check=True, capture_output=True, env=_env())
    return uri


def _env() -> dict[str, str]:
    return {**os.environ, **QUIET_ENV}


def _run(recipes: Path, registry: str, workers: int, work: Path) -> dict:
    args = [sys.executable, "-m", "pipeline", "run", "--json", str(recipes), "--tracking-uri", registry,
            "--artifacts", str(work / f"artifacts-{workers}"), "--executor", "ray", "--jobs", str(workers),
            "--store-url", (work / f"shared-{workers}").as_uri()]
    env = {**_env(), "KILN_RAY_WORKER_CACHE": str(work / f"worker-cache-{workers}")}
    load = os.getloadavg()[0]  # other work on the machine: these cores may not be ours alone
    started = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"kiln run with {workers} worker(s) failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    ran = len({s["key"] for r in summary["recipes"] for s in r["steps"] if s["status"] == "ran"})
    return {"workers": workers, "wall_s": wall, "steps": ran, "recipes": len(summary["recipes"]), "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tracking-uri")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-ray-bench-") as tmp:
        work = Path(tmp)
        registry = args.tracking_uri or _register(work / "registry")
        recipes = _recipes(Path(tempfile.mkdtemp(dir=work)), args.recipes)
        rows = [_run(recipes, registry, workers, work) for workers in args.workers]
    base = rows[0]["wall_s"]
    print(f"\n{args.recipes} digits-cnn recipes, kiln run --executor ray --jobs W (local Ray cluster), this machine")
    first = f"vs {rows[0]['workers']} worker"
    print(f"{'workers':>7} | {'wall s':>7} | {'steps run':>9} | {'s / recipe':>10} | {first:>11} | {'load (1 min)':>12}")
    print("-" * 73)
    for row in rows:
        print(f"{row['workers']:>7} | {row['wall_s']:>7.1f} | {row['steps']:>9} | {row['wall_s'] / row['recipes']:>10.1f} | "
              f"{base / row['wall_s']:>10.2f}x | {row['load']:>12.1f}")
    print(f"({os.cpu_count()} cores; a load above that means other processes were sharing them)")


if __name__ == "__main__":
    main()
