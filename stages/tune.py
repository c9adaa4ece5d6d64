"""tune: for one hardware target, find the fastest candidate artifact and session settings that pass the parity
gates, by measuring. Nothing is assumed about what is fast (INT8 dynamic can be slower than FP32 on a CNN; the
dynamo export can fuse less than TorchScript): every candidate the target's profile allows is measured.

1. Parity: every candidate (exporter x fusion x precision, built by earlier steps) runs under this target's
   provider on the validation inputs and is judged against the original framework's outputs. Failing
   candidates stay in the table with their reason, and out of the race.
2. Screening: each passing candidate is timed with the target's first settings.
3. Search: for the best `top_candidates`, one setting at a time (provider options, threads, execution mode,
   graph level, IO binding), keeping a change when it lowers the objective.
4. Final: the best few configurations are timed again, interleaved, with more runs; the lowest objective wins.

Trials count against max_trials and the wall-time budget; what the budget cut is recorded. The winner's model
and a session_config.json that reproduces its settings exactly are the step's output; tune.json holds every
trial, the Pareto front (latency vs error vs size) and the machine. A target whose provider is missing here is
skipped with the reason (an error only for the target the recipe publishes).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from pipeline import hardware, progress
from pipeline.errors import ModelError, first_line
from pipeline.schema import StageConfig, Strict
from pipeline.versions import onnxruntime_distribution
from stages import artifacts, export, gate, latency, machine, onnx_runtime, optimize, quantize
from stages.frameworks.pytorch import Exporter
from stages.tensors import ModelSpec, batch_of, chunked_outputs

VERSION = 6
Objective = Literal["p50", "p95", "throughput"]


class TuneSpace(Strict):
    """What artifacts to build and measure. Each exporter x fusion option gives an FP32 model; each precision
    variant of each of those is another candidate. Empty lists mean the recipe's own choice."""

    exporters: list[Exporter] = Field(
        default_factory=list, description="Default: export.exporter (on transformers the two fuse differently)"
    )
    fusion: list[optimize.Config] = Field(default_factory=list, description="Optimization options; default: [optimize]")
    precisions: list[quantize.QuantizeVariant] = Field(
        default_factory=list,
        description="Variants built only as tuning candidates (besides `variants`); a precision kind a target "
        "allows but no variant declares gets kiln's default for it",
    )


class TuneBudget(Strict):
    max_trials: int = Field(40, ge=1, description="Latency trials per target (screening, search, final)")
    time_budget_s: float = Field(600.0, gt=0, description="Wall time per target before the search stops")
    top_candidates: int = Field(2, ge=1, description="Artifacts whose session settings are searched after screening")


class TuneMeasure(Strict):
    """Every trial and the final are timed by validate's harness (stages/latency.py): warm blocks, re-warmed at
    every switch, stopped by precision."""

    warmup: int = Field(2, ge=1)
    iterations: int = Field(10, ge=5, description="Fewest timed runs per trial and batch size (a slow call: "
                            "min_seconds of runs, at least 5); more until target_ci is met")
    min_seconds: float = Field(1.0, ge=0, description="A slow call's minimum: this much timed work")
    target_ci: float = Field(0.05, gt=0, description="Measure until the objective's statistic is known to this "
                             "fraction (95 % CI half-width)")
    trial_seconds: float = Field(3.0, gt=0, description="Time a trial may take per batch size")
    final_seconds: float = Field(10.0, gt=0, description="Time the final comparison may take per batch size")


class Tune(Strict):
    """Hardware-targeted tuning: per target, measure every candidate artifact and session setting the target's
    profile allows, keep the fastest that passes the parity gates."""

    targets: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1,
                               description=f"Profiles: built-in ({', '.join(hardware.BUILTIN)}) or from `profiles`")
    profiles: dict[str, hardware.TargetProfile] = Field(default_factory=dict,
                                                        description="Define or override profiles")
    publish: str | None = Field(None, description="The target whose winner `select: tuned` publishes; default: the first")
    objective: Objective = Field(
        "p50", description="Minimized over the batch sizes (geometric mean); throughput = ms per item. p95 needs "
        "about 9x the runs for the same precision (benchmarks/harness_aa.py)"
    )
    batch_sizes: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="Default: validation.latency.batch_sizes"
    )
    space: TuneSpace = Field(default_factory=TuneSpace)
    gates: gate.ParityGates | None = Field(
        None, description="Parity gates for kiln's default precision candidates (auto-*); default: gates.parity"
    )
    budget: TuneBudget = Field(default_factory=TuneBudget)
    measure: TuneMeasure = Field(default_factory=TuneMeasure)

    @model_validator(mode="after")
    def _known_targets(self) -> "Tune":
        for name in self.targets:
            if name not in self.profiles and name not in hardware.BUILTIN:
                raise ValueError(f"targets: {name!r} is neither built in ({', '.join(hardware.BUILTIN)}) "
                                 "nor in tune.profiles")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets: each target once")
        if self.publish is not None and self.publish not in self.targets:
            raise ValueError(f"publish: {self.publish!r} is not one of tune.targets ({', '.join(self.targets)})")
        return self

    @property
    def published_target(self) -> str:
        return self.publish or self.targets[0]


class Candidate(Strict):
    """One artifact the tuner measures: how it was built and the parity gates it is held to."""

    exporter: str
    fusion: optimize.Config
    precision: str
    variant: str
    gates: gate.ParityGates


class Config(StageConfig):
    target: str
    profile: hardware.TargetProfile
    publish: bool
    objective: Objective
    batch_sizes: list[int]
    budget: TuneBudget
    measure: TuneMeasure
    candidates: dict[str, Candidate]


INPUTS = {"data": artifacts.SAMPLES, "reference": artifacts.METRICS, "cand.*": artifacts.ONNX}
OUTPUT = artifacts.ONNX
FINALISTS = 3
TIMING = ("p50_ms", "p50_ci_ms", "p95_ms", "p95_ci_ms", "p99_ms", "throughput_per_s", "iterations", "ci_target_met")
MARGIN = 0.02  # a setting must beat the current best by this fraction to be kept (timing noise)


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return ["numpy", "onnx", onnxruntime_distribution()]


def _threads(profile: hardware.TargetProfile, cores: int) -> list[int]:
    return profile.threads or sorted({cores, max(1, cores // 2)}, reverse=True)


def _error(metrics: dict) -> dict:
    outputs = metrics["outputs"].values()
    cosines = [o.get("mean_row_cosine", o["cosine"]) for o in outputs]
    return {"min_cosine": float(min(o["cosine"] for o in outputs)), "mean_cosine": float(min(cosines)),
            "max_abs_error": float(max(o["max_abs_error"] for o in outputs)),
            "accuracy": (metrics.get("task") or {}).get("candidate")}


def objective(per_batch: dict[str, dict], kind: str) -> float:
    """Geometric mean over batch sizes: p50/p95 ms per call, or ms per item for throughput."""
    if kind == "throughput":
        values = [1000.0 / t["throughput_per_s"] for t in per_batch.values()]
    else:
        values = [t[f"{kind}_ms"] for t in per_batch.values()]
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))


class _Search:
    def __init__(self, config: Config, spec: ModelSpec, feeds: dict[str, np.ndarray], started: float):
        self.config, self.spec, self.feeds, self.started = config, spec, feeds, started
        self.budget, self.measure = config.budget, config.measure
        self.trials: list[dict] = []
        self.stopped: str | None = None

    def exhausted(self) -> bool:
        if len(self.trials) >= self.budget.max_trials:
            self.stopped = f"max_trials {self.budget.max_trials} reached"
        elif time.perf_counter() - self.started > self.budget.time_budget_s:
            self.stopped = f"time_budget_s {self.budget.time_budget_s} used"
        return self.stopped is not None

    def _calls(self, path: Path, settings: dict) -> dict[str, object]:
        runner = onnx_runtime.Runner(path, settings)
        return {str(b): runner.call(batch_of(self.spec, self.feeds, b)) for b in self.config.batch_sizes}

    def _timed(self, calls: dict[str, object], batch: int, seconds: float) -> dict[str, dict]:
        """The harness every trial and the final use alike: same warm-up, re-warm, minimum and precision."""
        m = self.measure
        measured = latency.measure(calls, batch=batch, warmup=m.warmup, min_iterations=m.iterations,
                                   min_seconds=m.min_seconds, target_ci=m.target_ci,
                                   p95=self.config.objective == "p95", time_budget_s=seconds)
        return {name: {k: t[k] for k in TIMING} for name, t in measured.items()}

    def _say(self, what: str) -> None:
        done, limit = len(self.trials), self.budget.max_trials
        spent = time.perf_counter() - self.started
        left = min(self.budget.time_budget_s - spent, spent / done * (limit - done) if done else float("inf"))
        eta = f", ~{max(0, left):.0f} s left" if math.isfinite(left) else ""
        progress.update(f"trial {done + 1} of at most {limit}: {what}{eta}")

    def trial(self, candidate: str, path: Path, settings: dict, label: str) -> dict:
        """Time one (artifact, settings) pair at every batch size."""
        row = {"candidate": candidate, "settings": settings, "label": label}
        self._say(f"{candidate} {label}")
        try:
            calls = self._calls(path, settings)
            per_batch = {b: self._timed({"c": call}, int(b), self.measure.trial_seconds)["c"]
                         for b, call in calls.items()}
            row.update(latency=per_batch, objective=objective(per_batch, self.config.objective))
        except Exception as exc:  # noqa: BLE001 - a setting the provider rejects is a result, not a crash
            row.update(latency=None, objective=None, error=f"{type(exc).__name__}: {first_line(exc, 200)}")
        self.trials.append(row)
        return row

    def final(self, finalists: list[dict], paths: dict[str, Path]) -> None:
        """The best configurations again, side by side in the same rounds (each in warm blocks of its own, the
        order rotating), so drift hits them alike; every finalist is measured the same way."""
        progress.update(f"final: {len(finalists)} configurations side by side")
        runners = [onnx_runtime.Runner(paths[t["candidate"]], t["settings"]) for t in finalists]
        for t in finalists:
            t["final"] = {}
        for batch in self.config.batch_sizes:
            feeds = batch_of(self.spec, self.feeds, batch)
            measured = self._timed({str(i): r.call(feeds) for i, r in enumerate(runners)}, batch,
                                   self.measure.final_seconds)
            for i, t in enumerate(finalists):
                t["final"][str(batch)] = measured[str(i)]
        for t in finalists:
            t["final_objective"] = objective(t["final"], self.config.objective)


def _knobs(profile: hardware.TargetProfile, cores: int) -> list[tuple[str, list]]:
    return [
        ("provider_options", list(range(len(profile.provider_options)))),
        ("threads", _threads(profile, cores)),
        ("execution_mode", profile.execution_modes),
        ("graph_level", profile.graph_levels),
        ("io_binding", profile.io_binding),
    ]


def _settings(profile: hardware.TargetProfile, choice: dict, engine_cache: Path) -> dict:
    options = dict(profile.provider_options[choice["provider_options"]])
    if options.get("trt_engine_cache_enable") == "1":
        options.setdefault("trt_engine_cache_path", str(engine_cache))
    return onnx_runtime.settings(profile.provider, options, choice["threads"], choice["execution_mode"],
                                 choice["graph_level"], choice["io_binding"], profile.fixed_shapes)


def pareto(rows: list[dict]) -> list[str]:
    """Candidates no other candidate beats on latency, error and size at once."""
    points = [(r["candidate"], r["objective"], 1.0 - r["error"]["mean_cosine"], r["bytes"]) for r in rows]
    front = []
    for cid, lat, err, size in points:
        dominated = any(o_lat <= lat and o_err <= err and o_size <= size and (o_lat, o_err, o_size) != (lat, err, size)
                        for _, o_lat, o_err, o_size in points)
        if not dominated:
            front.append(cid)
    return front


def _judge_candidate(path: Path, settings: dict, spec: ModelSpec, feeds: dict[str, np.ndarray], reference: dict,
                     labels, gates: dict) -> dict:
    """One candidate run under the target's first settings and judged against the original's outputs."""
    try:
        runner = onnx_runtime.Runner(path, settings)
        names = [o.name for o in runner.session(feeds).get_outputs()]
        outputs = dict(zip(names, chunked_outputs(runner.run, spec, feeds)))
        found, metrics = gate.judge_parity(outputs, reference, labels, gates)
        failed = [v for v in found if not v["passed"]]
        return {"error": _error(metrics), "passed": not failed, "reason": failed[0]["message"] if failed else None}
    except Exception as exc:  # noqa: BLE001 - a candidate this provider cannot run is out of the race
        return {"passed": False, "reason": f"does not run: {type(exc).__name__}: {first_line(exc, 200)}"}


def _parity(config: Config, inputs: dict[str, Path], context: dict, settings_for, first: dict, spec: ModelSpec,
            feeds: dict[str, np.ndarray], reference: dict, labels) -> tuple[list[dict], dict[str, Path]]:
    """1. Parity under this target's provider: a table row for every candidate (failing ones with their reason,
    out of the race) and the model file of every candidate that was built."""
    rows, paths = [], {}
    for cid, what in config.candidates.items():
        row = {"candidate": cid, **{k: getattr(what, k) for k in ("exporter", "precision", "variant")},
               "fusion": what.fusion.model_dump(mode="json"), "bytes": None, "error": None}
        if f"cand.{cid}" not in inputs:  # its build failed (e.g. an exporter that cannot take this model)
            row.update(passed=False, reason=f"not built: {context.get('missing', {}).get(f'cand.{cid}', '?')}")
            rows.append(row)
            continue
        path = artifacts.onnx_model(inputs[f"cand.{cid}"])
        paths[cid] = path
        row["bytes"] = artifacts.onnx_bytes(path)
        quantized = artifacts.quantize_record(inputs[f"cand.{cid}"]) or {}
        if quantized.get("fallback"):  # a candidate the accuracy-aware fallback rescued (or tried to)
            row["float_nodes"] = len(quantized["fallback"]["excluded"])
            row["fallback_stopped"] = quantized["fallback"]["stopped"]
        row.update(_judge_candidate(path, settings_for(first), spec, feeds, reference, labels, what.gates.model_dump(mode="json")))
        rows.append(row)
    return rows, paths


def _screen(search: _Search, passing: list[dict], paths: dict[str, Path], settings_for, first: dict,
            target: str) -> list[dict]:
    """2. Each passing candidate timed with the target's first settings; the timed trials, fastest first."""
    for row in passing:
        if search.exhausted():
            row["screened"] = False
            continue
        search.trial(row["candidate"], paths[row["candidate"]], settings_for(first), "screen")
    screened = sorted((t for t in search.trials if t["objective"] is not None), key=lambda t: t["objective"])
    if not screened:
        raise ModelError(f"tune.{target}: no candidate could be timed ({search.trials[0].get('error')})")
    return screened


def _search_knobs(search: _Search, best: dict, path: Path, knobs: list[tuple[str, list]], first: dict,
                  settings_for) -> None:
    """3. One setting at a time from the first settings, keeping a change when it lowers the objective by more
    than MARGIN; the best trial found is marked with its choice."""
    choice, current = dict(first), best
    for knob, values in knobs:
        for value in values:
            if value == choice[knob] or search.exhausted():
                continue
            trial = search.trial(best["candidate"], path, settings_for({**choice, knob: value}), f"{knob}={value}")
            if trial["objective"] is not None and trial["objective"] < current["objective"] * (1 - MARGIN):
                choice, current = {**choice, knob: value}, trial
    current["choice"] = choice


def _finalists(trials: list[dict]) -> list[dict]:
    """4. The FINALISTS best distinct (candidate, settings) configurations."""
    seen, finalists = set(), []
    for t in sorted((t for t in trials if t["objective"] is not None), key=lambda t: t["objective"]):
        key = (t["candidate"], json.dumps(t["settings"], sort_keys=True))
        if key not in seen:
            seen.add(key)
            finalists.append(t)
        if len(finalists) == FINALISTS:
            break
    return finalists


def _challengers(trials: list[dict], finalists: list[dict], bar: float) -> list[dict]:
    """Each other candidate's best trial, where it is below `bar` (at most FINALISTS of them)."""
    raced = {t["candidate"] for t in finalists}
    best: dict[str, dict] = {}
    for t in trials:
        if t["objective"] is not None and t["candidate"] not in raced and t["objective"] < bar:
            if t["candidate"] not in best or t["objective"] < best[t["candidate"]]["objective"]:
                best[t["candidate"]] = t
    return sorted(best.values(), key=lambda t: t["objective"])[:FINALISTS]


def _race(config: Config, passing: list[dict], paths: dict[str, Path], spec: ModelSpec, feeds: dict[str, np.ndarray],
          knobs: list[tuple[str, list]], first: dict, settings_for) -> tuple[_Search, dict, tuple[float, float]]:
    """Screening, search and final with this step alone on the machine; the search, the winning trial and the
    load average before and after."""
    with latency.exclusive():  # the budget's clock starts once this step has the machine to itself
        load_before = os.getloadavg()[0]
        search = _Search(config, spec, feeds, time.perf_counter())
        screened = _screen(search, passing, paths, settings_for, first, config.target)
        for best in screened[: config.budget.top_candidates]:
            _search_knobs(search, best, paths[best["candidate"]], knobs, first, settings_for)
        # 4. the best distinct configurations, timed again side by side
        finalists = _finalists(search.trials)
        search.final(finalists, paths)
        winner = min(finalists, key=lambda t: t["final_objective"])
        # A candidate that never reached the final but whose best trial beat the winner's final figure races
        # the finalists again, all in one final: the published objective must be the lowest in the table.
        challengers = _challengers(search.trials, finalists, winner["final_objective"])
        if challengers:
            finalists += challengers
            search.final(finalists, paths)
            winner = min(finalists, key=lambda t: t["final_objective"])
        load_after = os.getloadavg()[0]
    return search, winner, (load_before, load_after)


def _table(rows: list[dict], trials: list[dict], winner: dict) -> None:
    """Each candidate's best measurement (the final, longer one where it reached the final, else its best trial),
    whether it is on the Pareto front, and which one won, written into its row."""
    by_candidate: dict[str, dict] = {}
    for t in sorted((t for t in trials if t["objective"] is not None), key=lambda t: "final" not in t):
        score = t.get("final_objective", t["objective"])
        best = by_candidate.get(t["candidate"])
        if best is None or (best["final"] == ("final" in t) and score < best["objective"]):
            by_candidate[t["candidate"]] = {"objective": score, "latency": t.get("final") or t["latency"],
                                            "final": "final" in t}
    bar = winner["final_objective"]
    for row in rows:
        best = by_candidate.get(row["candidate"])
        row["objective"] = best["objective"] if best else None
        row["latency"] = best["latency"] if best else None
        row["measured"] = None if best is None else "final" if best["final"] else "trial"
        if best and not best["final"] and best["objective"] < bar:
            # Only when more candidates beat the winner's final figure in their trials than a final races.
            row["note"] = (f"timed only in its own trial ({best['objective']:.4g} ms); not raced against the winner "
                           f"({bar:.4g} ms in the final): a final takes at most {FINALISTS} challengers")
    front = pareto([r for r in rows if r["objective"] is not None])
    for row in rows:
        row["pareto"] = row["candidate"] in front
        row["winner"] = row["candidate"] == winner["candidate"]


def _save_winner(path: Path, settings: dict, out: Path) -> dict:
    """The winner's model with its online optimization baked in (unless it ran with none), and the session
    settings that load it as measured; returns those settings."""
    if settings["session_options"]["graph_optimization_level"] == onnx_runtime.LEVELS["disabled"]:
        artifacts.copy_onnx(path, artifacts.onnx_model(out))
    else:
        settings = onnx_runtime.bake(path, settings, artifacts.onnx_model(out))
    artifacts.write_session_config(out, settings)
    return settings


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    started = time.perf_counter()
    target, profile = config.target, config.profile
    here = machine.describe()
    record: dict = {"target": target, "provider": profile.provider, "machine": here,
                    "objective": config.objective, "batch_sizes": config.batch_sizes}
    reason = machine.unavailable_reason(profile.provider, here)
    if reason:
        if config.publish:
            raise ModelError(f"tune.publish: target {target!r} cannot be tuned on this machine: {reason}")
        record["skipped"] = reason
        artifacts.write_tune_record(out, record)
        return {"target": target, "skipped": reason}

    spec = artifacts.spec(inputs["data"])
    feeds = artifacts.inputs(inputs["data"])
    labels = artifacts.labels(inputs["data"])
    reference = artifacts.reference(inputs["reference"])
    cores = here["cores"]
    first = {knob: values[0] for knob, values in _knobs(profile, cores)}
    engine_cache = out.parent / "trt-cache"  # beside out/: engines are not part of the result

    def settings_for(choice: dict) -> dict:
        return _settings(profile, choice, engine_cache)

    rows, paths = _parity(config, inputs, context, settings_for, first, spec, feeds, reference, labels)
    passing = [r for r in rows if r["passed"]]
    if not passing:
        reasons = "; ".join(f"{r['candidate']}: {r['reason']}" for r in rows[:3])
        raise ModelError(f"tune.{target}: no candidate passes the parity gates ({reasons})")
    search, winner, (load_before, load_after) = _race(config, passing, paths, spec, feeds, _knobs(profile, cores),
                                                      first, settings_for)
    _table(rows, search.trials, winner)
    chosen = next(r for r in rows if r["winner"])
    settings = _save_winner(paths[winner["candidate"]], winner["settings"], out)
    quantized = artifacts.quantize_record(inputs[f"cand.{winner['candidate']}"])
    if quantized is not None:  # how the winner was quantized (its fallback curve) goes with it into the report
        artifacts.write_quantize_record(out, quantized)
    record.update({
        "candidates": rows,
        "trials": search.trials,
        "winner": {"candidate": winner["candidate"], "settings": settings, "measured_with": winner["settings"],
                   "latency": winner["final"],
                   "objective": winner["final_objective"], "variant": chosen["variant"],
                   "precision": chosen["precision"], "exporter": chosen["exporter"],
                   "gates": config.candidates[winner["candidate"]].gates.model_dump(mode="json")},
        "budget": {"trials": len(search.trials), "seconds": round(time.perf_counter() - started, 1),
                   "stopped": search.stopped},
        # Timing on a machine busy with other work favours settings that suit that moment (e.g. fewer
        # threads); the report says so, since a lock only keeps kiln's own steps apart.
        "load_average": {"before": round(load_before, 2), "after": round(load_after, 2),
                         "busy": max(load_before, load_after) > 1.5 * cores},
    })
    artifacts.write_tune_record(out, record)
    return {"target": target, "skipped": None, "winner": winner["candidate"],
            "objective_ms": round(winner["final_objective"], 4), "trials": len(search.trials),
            "candidates": len(rows), "passing": len(passing)}


# The precision a tuning target allows but no variant of the recipe declares: kiln's default for that kind.
DEFAULT_PRECISIONS = [
    quantize.Fp16Variant(name="auto-fp16", kind="fp16"),
    quantize.Int8DynamicVariant(name="auto-int8-dynamic-pc", kind="int8-dynamic", per_channel=True),
    quantize.Int8DynamicVariant(name="auto-int8-dynamic-pt", kind="int8-dynamic", per_channel=False),
    quantize.Int8StaticVariant(name="auto-int8-static-pc", kind="int8-static", per_channel=True),
    quantize.WeightOnlyVariant(name="auto-weight-only-8", kind="weight-only", bits=8),
]


def _precisions(recipe, kinds: set[str]) -> list:
    precisions = [v for v in [*recipe.variants, *recipe.tune.space.precisions] if v.kind in kinds]
    covered = {v.kind for v in precisions}
    return precisions + [v for v in DEFAULT_PRECISIONS if v.kind in kinds - covered]


def _exported(graph, exporter: str) -> str:
    """The recipe's own export, or another exporter's as an optional candidate step."""
    recipe = graph.recipe
    if exporter == recipe.export.exporter:
        return "export"
    return graph.add(f"export.{exporter}", export.step_config(graph, exporter=exporter), {"model": "fetch", "data": "data"},
                     optional=True)


def _fusion_candidates(graph, exporter: str, exported: str, index: int, fusion, kinds: set[str],
                       precisions: list) -> dict[str, tuple[str, dict]]:
    """The candidates one exporter x fusion option gives, reusing the recipe's own steps where they coincide."""
    recipe, tune = graph.recipe, graph.recipe.tune
    base = f"{exporter}.f{index}"
    own = exported == "export" and fusion == recipe.optimize
    optimized = "optimize" if own else graph.add(f"optimize.{base}", fusion.model_dump(mode="json"),
                                                 {"onnx": exported}, optional=True)
    described = {"exporter": exporter, "fusion": fusion.model_dump(mode="json")}
    found = {}
    if "fp32" in kinds:
        found[f"{base}.fp32"] = (optimized, {**described, "precision": "fp32", "variant": "fp32",
                                             "gates": recipe.gates.parity.model_dump(mode="json")})
    for variant in precisions:
        default = tune.gates if tune.gates and variant in DEFAULT_PRECISIONS else recipe.gates.parity
        gates = variant.gates or default
        if own and variant in recipe.variants:
            quantized = f"quantize.{variant.name}"
        else:
            quantized = graph.add(f"quantize.{variant.name}.{base}", quantize.step_config(variant, gates, fusion.level),
                                  {"onnx": optimized, "data": "data", "metrics": "validate"}, optional=True)
        found[f"{base}.{variant.name}"] = (quantized, {**described, "precision": variant.kind, "variant": variant.name,
                                                       "gates": gates.model_dump(mode="json")})
    return found


def plan(graph) -> None:
    """The candidate artifacts (exporter x fusion x precision) as ordinary cached steps, and one tune step per
    target that measures those its profile allows; with `select: tuned`, the published target's winner is a
    candidate validated and gated in full like any other."""
    recipe, tune = graph.recipe, graph.recipe.tune
    if tune is None:
        return
    profiles = {t: hardware.resolve(t, tune.profiles) for t in tune.targets}
    kinds = {k for p in profiles.values() for k in p.precisions}
    precisions = _precisions(recipe, kinds)
    candidates: dict[str, tuple[str, dict]] = {}
    for exporter in tune.space.exporters or [recipe.export.exporter]:
        exported = _exported(graph, exporter)
        for index, fusion in enumerate(tune.space.fusion or [recipe.optimize]):
            candidates.update(_fusion_candidates(graph, exporter, exported, index, fusion, kinds, precisions))
    for target, profile in profiles.items():
        allowed = {cid: c for cid, c in candidates.items() if c[1]["precision"] in profile.precisions}
        config = {"target": target, "profile": profile.model_dump(mode="json"),
                  "publish": target == tune.published_target, "objective": tune.objective,
                  "batch_sizes": tune.batch_sizes or recipe.validation.latency.batch_sizes,
                  "budget": tune.budget.model_dump(mode="json"), "measure": tune.measure.model_dump(mode="json"),
                  "candidates": {cid: what for cid, (_, what) in allowed.items()}}
        inputs = {"data": "data", "reference": "validate", **{f"cand.{cid}": step for cid, (step, _) in allowed.items()}}
        graph.add(f"tune.{target}", config, inputs, resources=profile.resources)
    if recipe.select == "tuned":
        winner = f"tune.{tune.published_target}"
        graph.add_candidate("tuned", model=winner, exported=winner, session=winner, checks={"tuned": winner})
