"""gate: judge validate's measurements against the recipe's gates. Pure: metrics + thresholds -> verdicts.
The first failed verdict is the one-line reason `kiln run` prints."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from pipeline.schema import StageConfig, Strict
from stages import artifacts, parity

VERSION = 10


class OutputGate(Strict):
    atol: float | None = Field(None, ge=0)
    rtol: float | None = Field(None, ge=0)
    min_cosine: float | None = Field(None, ge=-1, le=1, description="Cosine of the whole output tensor")
    min_mean_cosine: float | None = Field(None, ge=-1, le=1, description="Mean of per-sample cosines (embeddings)")
    min_top1: float | None = Field(None, ge=0, le=1, description="Fraction of rows whose argmax agrees")
    max_error_to_signal: float | None = Field(
        None, ge=0, description="||onnx - original|| / ||original - its mean over the samples||: the error as a "
        "fraction of the part of the output that varies between inputs (cosine alone passes a model that answers "
        "its mean output for every input; that model measures 1.0 here)")


class ParityGates(Strict):
    # max_error_to_signal 0.01: fp32 exports measured 0 (digits CNN) and 2.5e-7 (the BERT-style encoder), a model
    # answering its mean output for every input measures 1.0; 0.01 leaves room for fusions' reordered sums.
    default: OutputGate = Field(default_factory=lambda: OutputGate(atol=1e-4, rtol=1e-3, min_cosine=0.9999,
                                                                   max_error_to_signal=0.01))
    outputs: dict[str, OutputGate] = Field(default_factory=dict, description="Per output name; overrides default")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="Needs labels; fraction, 0.005 = 0.5 %")
    allow_degenerate: bool = Field(
        False, description="Judge parity even when the original's output cannot show an error: a float output that "
        "does not vary between the validation samples, is all zero, or holds NaN/Inf (by default a gate failure)")


class LatencyGates(Strict):
    max_p95_ms: float | dict[int, float] | None = Field(None, description="ONNX Runtime p95, all or per batch size")
    min_speedup: float | dict[int, float] | None = Field(None, description="Original p50 / ONNX Runtime p50")
    max_regression: float | None = Field(
        None, ge=0, description="Fail when ONNX Runtime p50 is slower than the previous published version's by more "
        "than this fraction (0.2 = 20 %); this machine drifts 15-20 % between runs"
    )


class Gates(Strict):
    parity: ParityGates = Field(default_factory=ParityGates)
    latency: LatencyGates = Field(default_factory=LatencyGates)


class Config(StageConfig):
    gates: Gates
    blocking: bool = Field(True, description="A failed verdict stops the build (the published candidate's gate)")


INPUTS = {"metrics": artifacts.METRICS, "quantized": artifacts.ONNX, "tuned": artifacts.ONNX}
OUTPUT = artifacts.VERDICTS


def tools(config: Config, inputs: dict[str, Path]) -> list[str]:
    return ["numpy"]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _per_batch(value, batch: str):
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get(batch, value.get(int(batch)) if batch.isdigit() else None)
    return value


def _output_gate(gates: dict, name: str) -> dict:
    merged = dict(gates["parity"]["default"])
    merged.update({k: v for k, v in gates["parity"]["outputs"].get(name, {}).items() if v is not None})
    return merged


def _where(metrics: dict) -> str:
    """Where the error starts, from validate's layer-by-layer comparison, as a clause for a failure message."""
    loc = metrics.get("localization") or {}
    if not loc.get("available") or not loc.get("layers_matched"):
        return ""
    first = loc.get("first_divergent")
    if first:
        return (f"; first divergent layer: {first['layer']} ({first['type']}, relative error "
                f"{first['relative_error']:.3g} at ONNX node {first['onnx_node']})")
    return (f"; the exported graph matches the original layer by layer ({loc['layers_matched']} layers), "
            "so the error comes from a later stage")


def _verdict(gate: str, subject: str, passed: bool, value, threshold, message: str) -> dict:
    return {"gate": gate, "subject": subject, "passed": bool(passed), "value": value, "threshold": threshold,
            "message": message}


def _unknown_outputs(gates: dict, metrics: dict) -> list[dict]:
    """Per-output gates that name an output the model does not have."""
    return [_verdict("parity.outputs", name, False, None, None,
                     f"gates.parity.outputs.{name}: the model has no output '{name}' "
                     f"(outputs: {', '.join(metrics['outputs'])})")
            for name in sorted(set(gates["parity"]["outputs"]) - set(metrics["outputs"]))]


def _degenerate_verdicts(gates: dict, metrics: dict) -> list[dict]:
    """One per output whose original cannot show an error: parity against a constant, zero or NaN output passes
    a garbage candidate (Keras MobileNetV2 with weights=None answers 0.001 everywhere; its INT8 graph measured
    cosine 1.0). Listed first, so it is the reason a build gives."""
    allowed = gates["parity"].get("allow_degenerate", False)
    found = []
    for name, measured in metrics["outputs"].items():
        why = parity.degenerate(measured)
        if why:
            found.append(_verdict(
                "degenerate", name, allowed, measured.get("variation"), {"allow_degenerate": allowed},
                f"output '{name}': {why}; parity on it proves nothing — use real validation data, check the model "
                "(untouched BatchNorm statistics?), or set gates.parity.allow_degenerate: true"))
    return found


def _tolerance_verdicts(gate: dict, name: str, metrics: dict, reference: dict, candidate: dict,
                        sweep: dict | None) -> list[dict]:
    """atol/rtol on one output, at the validated sizes and at every size of the shape sweep."""
    atol, rtol = gate.get("atol") or 0.0, gate.get("rtol") or 0.0
    label = f"output '{name}'"
    trials = [("", reference[name], candidate[name])]
    for index, trial in enumerate(metrics.get("shape_sweep") or []):
        if sweep and f"{index}/reference/{name}" in sweep:
            trials.append((f" at axis sizes {trial['sizes']}", sweep[f"{index}/reference/{name}"],
                           sweep[f"{index}/candidate/{name}"]))
    found = []
    for where, ref, cand in trials:
        worst = parity.tolerance_violation(ref, cand, atol, rtol)
        found.append(_verdict(
            "atol_rtol", name + where, worst["passed"], worst["worst_abs_error"], {"atol": atol, "rtol": rtol},
            f"{label}{where}: |onnx - original| = {_fmt(worst['worst_abs_error'])} at index "
            f"{tuple(worst['worst_index'])} exceeds atol {_fmt(atol)} + rtol {_fmt(rtol)} x |original| = "
            f"{_fmt(worst['worst_allowed'])} ({worst['violations']} of {worst['elements']} elements out of "
            f"tolerance){_where(metrics)}"))
    return found


def _output_verdicts(gate: dict, name: str, measured: dict, metrics: dict, reference: dict, candidate: dict,
                     sweep: dict | None) -> list[dict]:
    """One output's parity gates: shape, finite values, tolerance, cosine, error to signal, mean cosine, top-1
    agreement."""
    label = f"output '{name}'"
    if measured.get("shape_mismatch"):
        return [_verdict("shape", name, False, measured["candidate_shape"], measured["shape"],
                         f"{label}: ONNX shape {measured['candidate_shape']} != original {measured['shape']}")]
    bad = measured["nan"] + measured["inf"]
    # Any NaN fails, even where the original produces one too: a serving team cannot ship it either way.
    found = [_verdict("finite", name, bad == 0, bad, 0,
                      f"{label}: {measured['nan']} NaN and {measured['inf']} Inf values in the ONNX output "
                      f"({measured['reference_nan']} NaN in the original's)")]
    if gate.get("atol") is not None or gate.get("rtol") is not None:
        found += _tolerance_verdicts(gate, name, metrics, reference, candidate, sweep)
    if gate.get("min_cosine") is not None:
        found.append(_verdict(
            "min_cosine", name, measured["cosine"] >= gate["min_cosine"], measured["cosine"], gate["min_cosine"],
            f"{label}: cosine similarity {measured['cosine']:.6f} is below min_cosine {gate['min_cosine']}"
            f"{_where(metrics)}"))
    limit, value = gate.get("max_error_to_signal"), measured.get("error_to_signal")
    if limit is not None and value is not None:  # None: not measurable (integers, one sample, no variation)
        found.append(_verdict(
            "max_error_to_signal", name, value <= limit, value, limit,
            f"{label}: the error is {value:.3g} of the output's variation between inputs (||onnx - original|| / "
            f"||original - its mean||), above max_error_to_signal {limit}{_where(metrics)}"))
    if gate.get("min_mean_cosine") is not None:
        value = measured.get("mean_row_cosine")
        found.append(_verdict(
            "min_mean_cosine", name, value is not None and value >= gate["min_mean_cosine"], value,
            gate["min_mean_cosine"],
            f"{label}: mean per-sample cosine {value if value is None else round(value, 6)} is below "
            f"min_mean_cosine {gate['min_mean_cosine']}{_where(metrics)}"))
    if gate.get("min_top1") is not None:
        agreement = measured.get("top1_agreement")
        if agreement is None:
            found.append(_verdict("min_top1", name, False, None, gate["min_top1"],
                                  f"gates.parity min_top1: {label} has no class axis (shape {measured['shape']})"))
        else:
            found.append(_verdict("min_top1", name, agreement >= gate["min_top1"], agreement, gate["min_top1"],
                                  f"{label}: top-1 agreement {agreement:.4f} is below min_top1 {gate['min_top1']}"))
    return found


def _task_verdicts(gates: dict, metrics: dict) -> list[dict]:
    """The accuracy drop on labelled data, when the gates bound it and validate measured it."""
    max_drop = gates["parity"].get("max_accuracy_drop")
    if max_drop is None or not metrics.get("task"):
        return []
    task = metrics["task"]
    return [_verdict("max_accuracy_drop", task["output"], task["drop"] <= max_drop, task["drop"], max_drop,
                     f"accuracy dropped {task['drop']:.4f} ({task['reference']:.4f} -> {task['candidate']:.4f}), "
                     f"more than max_accuracy_drop {max_drop}")]


def _latency_verdicts(gates: dict, metrics: dict, baseline: dict | None) -> list[dict]:
    """Per batch size: p95 budget, speedup over the original, regression against the baseline version."""
    found = []
    for batch, timing in metrics["latency"].items():
        limit = _per_batch(gates["latency"].get("max_p95_ms"), batch)
        if limit is not None:
            p95 = timing["onnxruntime"]["p95_ms"]
            found.append(_verdict("max_p95_ms", f"batch {batch}", p95 <= limit, p95, limit,
                                  f"batch {batch}: ONNX Runtime p95 {p95:.3f} ms exceeds max_p95_ms {limit}"))
        minimum = _per_batch(gates["latency"].get("min_speedup"), batch)
        if minimum is not None:
            speedup = timing["speedup_p50"]
            found.append(_verdict(
                "min_speedup", f"batch {batch}", speedup >= minimum, speedup, minimum,
                f"batch {batch}: speedup {speedup:.2f}x over the original is below min_speedup {minimum}x"))
        limit = gates["latency"].get("max_regression")
        if limit is not None and baseline:
            before = baseline.get("metrics", {}).get("latency", {}).get(batch)
            if before:
                ratio = timing["onnxruntime"]["p50_ms"] / before["onnxruntime"]["p50_ms"]
                version = baseline.get("source", {}).get("version")
                found.append(_verdict(
                    "max_regression", f"batch {batch}", ratio <= 1 + limit, ratio, 1 + limit,
                    f"batch {batch}: ONNX Runtime p50 {timing['onnxruntime']['p50_ms']:.3f} ms is {ratio:.2f}x "
                    f"version {version}'s {before['onnxruntime']['p50_ms']:.3f} ms, beyond max_regression {limit}"))
    return found


def verdicts(gates: dict, metrics: dict, reference: dict, candidate: dict, sweep: dict | None = None,
             baseline: dict | None = None) -> list[dict]:
    found = _unknown_outputs(gates, metrics) + _degenerate_verdicts(gates, metrics)
    for name, measured in metrics["outputs"].items():
        found += _output_verdicts(_output_gate(gates, name), name, measured, metrics, reference, candidate, sweep)
    found += _task_verdicts(gates, metrics)
    found += _latency_verdicts(gates, metrics, baseline)
    return found


def judge_parity(candidate: dict, reference: dict, labels, gates: dict) -> tuple[list[dict], dict]:
    """Parity alone (no latency), for candidates judged before a full validation: precision variants during
    their fallback and every candidate the tuner measures. Returns (verdicts, metrics)."""
    names = list(candidate)
    metrics = {"outputs": {n: parity.compare(reference[n], candidate[n]) for n in names}, "latency": {}, "task": None}
    if labels is not None:
        first = names[0]
        metrics["task"] = {"output": first, "reference": parity.accuracy(reference[first], labels),
                           "candidate": parity.accuracy(candidate[first], labels)}
        metrics["task"]["drop"] = metrics["task"]["reference"] - metrics["task"]["candidate"]
    return verdicts({"parity": gates, "latency": {}}, metrics, reference, candidate), metrics


def run(config: Config, inputs: dict[str, Path], out: Path, context: dict) -> dict:
    metrics = artifacts.metrics(inputs["metrics"])
    reference = artifacts.reference(inputs["metrics"])
    candidate = artifacts.candidate(inputs["metrics"])
    sweep = artifacts.sweep(inputs["metrics"])
    baseline = json.loads(Path(context["baseline"]).read_text()) if context.get("baseline") else None
    gates = config.gates.model_dump(mode="json")  # judged as data: the tuned winner's gates come from tune.json
    if "tuned" in inputs:  # the tuned winner is held to the parity gates of the precision it won with
        gates = {**gates, "parity": artifacts.tune_record(inputs["tuned"])["winner"]["gates"]}
    found = verdicts(gates, metrics, reference, candidate, sweep, baseline)
    failed = [v for v in found if not v["passed"]]
    reason = failed[0]["message"] if failed else None
    if failed and "quantized" in inputs:
        reason += _fallback_note(artifacts.quantize_record(inputs["quantized"]))
    result = {"passed": not failed, "verdicts": found, "reason": reason}
    artifacts.write_verdicts(out, result)
    verdict = {"passed": not failed, "reason": reason}
    # A variant the recipe does not publish is judged and reported, but does not stop the build.
    blocking = config.blocking
    return {
        "verdict": verdict if blocking else None,
        "advisory": None if blocking else verdict,
        "checked": len(found),
        "failed": len(failed),
    }


def _fallback_note(quantize: dict) -> str:
    fallback = quantize.get("fallback") or {}
    rounds = len(fallback.get("curve") or []) - 1
    if rounds <= 0:
        return f"; accuracy-aware fallback: {fallback['stopped']}" if fallback.get("stopped") else ""
    excluded = len(fallback.get("excluded") or [])
    return (f"; accuracy-aware fallback kept {excluded} node(s) in float after {rounds} round(s) "
            f"and stopped: {fallback.get('stopped')}")


def plan_candidate(graph, candidate) -> None:
    """Every candidate model is judged; only the one the recipe publishes (`select`) stops the build."""
    recipe = graph.recipe
    gates = {**recipe.gates.model_dump(mode="json"),
             "parity": (candidate.parity or recipe.gates.parity).model_dump(mode="json")}
    candidate.verdicts = graph.add(f"gate{candidate.suffix}", {"gates": gates, "blocking": recipe.select == candidate.name},
                                   {"metrics": candidate.metrics, **candidate.checks}, **graph.baseline())
