"""fallback: accuracy-aware fallback for a reduced-precision model. Finds, by measuring, the few nodes whose float
precision the model needs, and keeps only those in float (the quantizer's `nodes_to_exclude`).

A node's own quantization noise (its SQNR) says little about what it does to the model's output: on MiniLM the
noisiest MatMuls were the attention outputs, while the output that matters was the FFN's. So every candidate is
judged by its end-to-end effect:

1. Candidates: every node the quantizer changed in this graph, whatever its op type (MatMul, Attention, Gather,
   EmbedLayerNormalization, Conv, and in QDQ graphs Add, Relu, ...), alone and grouped by role. A role is the job a
   node does in every layer: the exporter's scope name with the layer numbers taken out
   (`/bert/encoder/layer.*/output/dense/MatMul`), or for a node without a scope (a fused one) its op type and what
   feeds it (`MatMul after BiasGelu`).
2. Probes: each role group, then single nodes (members of the most harmful groups first, SQNR breaking ties), each
   quantized with only it in float and run on the probe samples. Its impact is how much the error falls, the
   error being the output's error power relative to its variation between samples. At most `max_probes`.
3. Greedy: the candidate with the most impact per node newly kept in float goes next (a group's impact less what
   its members already in float removed alone). After each addition the model is rebuilt and judged by the gates
   on every validation sample; an addition that does not lower the error is undone. When what helped alone is
   used up, the units left are probed again on top of what is in float (errors interact). The search stops when
   the gates pass or the budget (rounds, fraction of the changed nodes) is used.
4. Trim: once the gates pass, each unit in float is quantized again (latest first) where the gates still pass
   without it: fewer float nodes, a faster model.
5. The curve: every round's error, the nodes in float with their roles, and the b1 latency of its model (the
   kept rounds timed side by side at the end), so the accuracy/speed trade is visible in the report.

A Conv/MatMul/Gemm and the activation after it are one unit: a QDQ graph quantizes the tensor between them.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from pydantic import Field

from pipeline import progress
from pipeline.schema import Strict


class Fallback(Strict):
    """Accuracy-aware fallback: when the variant misses its parity gates, find the nodes whose float precision
    matters most (each node and each role group measured end to end) and keep those in float, within a budget."""

    enabled: bool = True
    max_rounds: int = Field(8, ge=1, description="Greedy additions, each a full rebuild judged by the gates")
    max_probes: int = Field(32, ge=0, description="Candidates (role groups, then single nodes) measured alone in "
                            "float on the probe samples before the greedy search")
    probe_samples: int = Field(16, ge=1, description="Validation samples the probes run on, drawn with the seed")
    max_excluded_fraction: float = Field(0.25, gt=0, le=1, description="Of the nodes the quantizer changed")
    trim: bool = Field(True, description="Once the gates pass, quantize each float node again (latest first) "
                       "where the gates still pass without it")
    time_rounds: bool = Field(True, description="Time each kept round's model at batch 1, side by side, for the "
                              "curve (about 1 s each)")


# Nodes that quantize the graph's own tensors rather than do its work: never a candidate.
QUANTIZER_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Activations a quantized Conv/MatMul/Gemm carries along (ONNX Runtime fuses them): one candidate with it.
FUSED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid"}


def changed_nodes(source, quantized) -> list:
    """The source graph's nodes the quantizer changed: replaced (their name gone, or now another op type, e.g.
    MatMul -> MatMulInteger, Attention -> QAttention) or fed by a DequantizeLinear (QDQ)."""
    by_name = {n.name: n for n in quantized.node if n.name}
    producer = {o: n.op_type for n in quantized.node for o in n.output}
    changed = []
    for node in source.node:
        if not node.name or node.op_type in QUANTIZER_OPS:
            continue
        now = by_name.get(node.name)
        if now is None or now.op_type != node.op_type or any(producer.get(i) == "DequantizeLinear" for i in now.input):
            changed.append(node)
    return changed


def roles(graph, nodes: list) -> dict[str, str]:
    """{node name: role}: the scope name without layer numbers, or `<op> after <producer op>` for a node the
    exporter gave no scope (fused nodes, dynamo's flat names)."""
    producer = {o: n.op_type for n in graph.node for o in n.output}
    found = {}
    for node in nodes:
        if "/" in node.name:
            found[node.name] = re.sub(r"_\d+$", "", re.sub(r"\.\d+(?=/|$)", ".*", node.name))
        else:
            feeding = next((producer[i] for i in node.input if i in producer), "the input")
            found[node.name] = f"{node.op_type} after {feeding}"
    return found


def fused_activations(graph) -> dict:
    """{tensor: the activation node that is its only consumer} (a Conv's Relu, which quantizers fuse)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return {tensor: nodes[0] for tensor, nodes in consumers.items()
            if len(nodes) == 1 and nodes[0].op_type in FUSED_ACTIVATIONS}


def units(graph, changed: list, role: dict[str, str]) -> list[dict]:
    """The changed nodes as the fallback's smallest candidates: a node together with the activation that follows
    it (its only consumer), since a QDQ graph quantizes the tensor between a Conv and its Relu: either alone in
    float changes little. {node (the head), op, role, nodes, ops}."""
    names = {n.name for n in changed}
    activation = fused_activations(graph)
    follower = {n.name: activation[n.output[0]] for n in changed
                if n.output and n.output[0] in activation and activation[n.output[0]].name in names}
    absorbed = {f.name for f in follower.values()}
    found = []
    for node in changed:
        if node.name in absorbed:
            continue
        members = [node] + ([follower[node.name]] if node.name in follower else [])
        found.append({"node": node.name, "op": node.op_type, "role": role[node.name],
                      "nodes": [m.name for m in members], "ops": [m.op_type for m in members]})
    return found


def relative_error(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """Mean over float outputs of the error power relative to the output's variation between samples
    (sum |y - r|^2 / sum |r - mean(r)|^2): the square of the gates' error/signal. Plain signal power where
    the output does not vary (one sample)."""
    errors = []
    for name, got in outputs.items():
        ref = reference.get(name)
        if ref is None or ref.shape != got.shape or not np.issubdtype(ref.dtype, np.floating):
            continue
        ref64 = ref.astype(np.float64)
        noise = float(np.sum((got.astype(np.float64) - ref64) ** 2))
        signal = float(np.sum((ref64 - ref64.mean(axis=0)) ** 2)) if len(ref64) > 1 else 0.0
        if signal <= 0:
            signal = float(np.sum(ref64**2))
        errors.append(noise / signal if signal > 0 else (0.0 if noise == 0 else float("inf")))
    return float(np.mean(errors)) if errors else 0.0


@dataclass
class Hooks:
    """What the search asks of the stage that quantizes."""

    build: Callable[[list[str]], None]  # quantize with these nodes in float and finish the model
    judge: Callable[[], tuple[list[dict], dict, float]]  # the built model: verdicts, summary, relative error
    probe: Callable[[list[str]], float]  # relative error on the probe samples with these nodes in float
    keep: Callable[[int], None]  # keep a copy of the built model as this round's (for timing at the end)
    time: Callable[[list[int]], dict[int, float]]  # these rounds' models side by side: p50 ms at batch 1


def _score(found: list[dict], error: float) -> tuple:
    """Better = fewer failed gates, then a lower error."""
    return (-sum(not v["passed"] for v in found), -error)


def _candidates(found: list[dict]) -> tuple[list[dict], list[dict]]:
    """Role groups (two units or more) and single units, in the order they are probed."""
    by_role: dict[str, list[dict]] = {}
    for unit in found:
        by_role.setdefault(unit["role"], []).append(unit)
    groups = [{"role": r, "nodes": [n for u in members for n in u["nodes"]], "heads": [u["node"] for u in members]}
              for r, members in by_role.items() if len(members) > 1]
    groups.sort(key=lambda g: (-len(g["heads"]), g["role"]))
    singles = [{"role": u["role"], "nodes": u["nodes"], "heads": [u["node"]]} for u in found]
    return groups, singles


def _probe_all(config: Fallback, found: list[dict], noise: dict[str, float], hooks: Hooks, base: float) -> list[dict]:
    """Each candidate's impact: the probe error with everything quantized minus the one with it alone in float.
    Groups first; then single units, those in the groups that hurt most (and ungrouped ones) first, the SQNR
    pass breaking ties."""
    groups, singles = _candidates(found)
    probed: list[dict] = []
    budget = config.max_probes

    def measure(candidate: dict) -> None:
        progress.update(f"fallback probe {len(probed) + 1} of at most {budget}: {candidate['role']}"
                        + (f" ({len(candidate['heads'])} nodes)" if len(candidate["heads"]) > 1 else ""))
        error = hooks.probe(candidate["nodes"])
        probed.append({**candidate, "error": error, "impact": base - error})

    for group in groups[:budget]:
        measure(group)
    group_impact = {g["role"]: g["impact"] for g in probed}
    grouped = {h for g in groups for h in g["heads"]}
    singles.sort(key=lambda s: (-(group_impact.get(s["role"], float("inf")) if s["heads"][0] in grouped
                                  else float("inf")), -noise.get(s["heads"][0], 0.0), s["heads"][0]))
    for single in singles[: max(0, budget - len(probed))]:
        measure(single)
    return probed


def _reprobe(config: Fallback, found_units: list[dict], excluded: list[str], hooks: Hooks, single: dict[str, float],
             record: dict) -> list[dict]:
    """Each unit not yet in float probed on top of `excluded` (the most helpful alone first, at most max_probes):
    candidates whose impact is what they add now. Recorded with the probes, as pass 2 and on."""
    base = hooks.probe(excluded)
    left = [u for u in found_units if u["node"] not in excluded]
    left.sort(key=lambda u: (-single.get(u["node"], 0.0), u["node"]))
    found = []
    for unit in left[: config.max_probes]:
        progress.update(f"fallback probe {len(found) + 1} of at most {min(len(left), config.max_probes)} on top of "
                        f"{len(excluded)} node(s) in float: {unit['role']}")
        error = hooks.probe(excluded + unit["nodes"])
        found.append({"role": unit["role"], "nodes": unit["nodes"], "heads": [unit["node"]], "error": error,
                      "impact": base - error})
        single[unit["node"]] = 0.0  # its impact is now measured on top of what is in float already
    record["probes"] += [{"role": p["role"], "nodes": len(p["nodes"]), "node": p["heads"][0], "impact": p["impact"],
                          "error": p["error"], "on_top_of": len(excluded)} for p in found]
    record["cost"]["probes"] += len(found) + 1
    return [p for p in found if p["impact"] > 0]


def _worth(candidate: dict, excluded: list[str], single: dict[str, float]) -> float:
    """Estimated error removed per node newly kept in float: a candidate's impact, less what its members already
    in float removed on their own (probed alone)."""
    new = [n for n in candidate["nodes"] if n not in excluded]
    done = sum(single.get(h, 0.0) for h in candidate["heads"] if h in excluded)
    return (candidate["impact"] - done) / len(new) if new else 0.0


def _greedy(config: Fallback, found_units: list[dict], candidates: list[dict], single: dict[str, float],
            hooks: Hooks, record: dict) -> tuple[list[str], str | None]:
    """Add the most worthwhile candidate that fits the budget, rebuild, judge, keep it if it helped; until the
    gates pass or the budget is used. Appends to record's curve; returns (excluded, why it stopped)."""
    curve, info = record["curve"], record["info"]
    found, error = record["found"], curve[0]["error"]
    budget = record["budget_nodes"]
    excluded: list[str] = []
    built = probed_with = excluded
    stopped = None
    while any(not v["passed"] for v in found):
        if len(curve) - 1 >= config.max_rounds:
            stopped = f"budget used: max_rounds {config.max_rounds}"
            break
        candidates = [c for c in candidates if _worth(c, excluded, single) > 0]
        if not candidates and excluded != probed_with:
            # What helped alone is used up; with these nodes in float, the others' effect has changed (errors
            # interact): probe each remaining unit again on top of them.
            probed_with = list(excluded)
            candidates = _reprobe(config, found_units, excluded, hooks, single, record)
        fits = [c for c in candidates if len(set(excluded) | set(c["nodes"])) <= budget]
        if not fits:
            stopped = (f"budget used: max_excluded_fraction {config.max_excluded_fraction} ({budget} of "
                       f"{len(info)} changed nodes)" if candidates else
                       "no candidate left whose float fallback lowers the error")
            break
        candidate = max(fits, key=lambda c: (_worth(c, excluded, single), -len(c["nodes"]), c["role"], c["heads"][0]))
        candidates.remove(candidate)
        new = [n for n in candidate["nodes"] if n not in excluded]
        trial = excluded + new
        progress.update(f"fallback round {len(curve)} of at most {config.max_rounds}: {len(trial)} node(s) in float")
        hooks.build(trial)
        built = trial
        trial_found, trial_measured, trial_error = hooks.judge()
        helped = _score(trial_found, trial_error) > _score(found, error)
        curve.append({"round": len(curve), "added": [info[n] for n in new], "role": candidate["role"],
                      "float_nodes": len(trial), "after": trial_measured, "error": trial_error,
                      "passed": all(v["passed"] for v in trial_found), "kept": helped,
                      "p50_ms_b1": None})
        if helped:
            excluded, found, error = trial, trial_found, trial_error
            hooks.keep(curve[-1]["round"])
    if built != excluded:  # the last trial did not help: rebuild the best model found
        hooks.build(excluded)
    record["found"] = found
    return excluded, stopped if any(not v["passed"] for v in found) else None


def _trim(config: Fallback, excluded: list[str], hooks: Hooks, record: dict) -> list[str]:
    """Once the gates pass: each unit in float, latest first, quantized again if the gates still pass without
    it (a unit that helped early can be redundant after later ones). Fewer float nodes, a faster model."""
    curve, info = record["curve"], record["info"]
    heads = list(dict.fromkeys(info[n]["head"] for n in excluded))
    members = {h: [n for n in excluded if info[n]["head"] == h] for h in heads}
    for head in reversed(heads):
        if len(members) == 1:
            break  # everything quantized is where the search started, and it failed
        trial = [n for n in excluded if n not in members[head]]
        progress.update(f"fallback trim: quantizing {head} again ({len(trial)} node(s) stay in float)")
        hooks.build(trial)
        found, measured, error = hooks.judge()
        passed = all(v["passed"] for v in found)
        curve.append({"round": len(curve), "added": [], "removed": [info[n] for n in members[head]],
                      "role": info[head]["role"], "float_nodes": len(trial if passed else excluded),
                      "after": measured, "error": error, "passed": passed, "kept": passed, "p50_ms_b1": None})
        if passed:
            excluded = trial
            del members[head]
            record["found"] = found
            hooks.keep(curve[-1]["round"])
    if curve[-1].get("removed") and not curve[-1]["kept"]:
        hooks.build(excluded)  # the last trim failed: rebuild the passing model
    return excluded


def search(config: Fallback, found_units: list[dict], found: list[dict], measured: dict, error: float, hooks: Hooks,
           noise: dict[str, float]) -> dict:
    """The fallback for a variant whose first build (`found`, `measured`, `error`) misses its gates.
    `found_units`: the changed nodes as units (see units()); `noise`: head node -> relative noise power it adds
    (the SQNR pass). Leaves the best model found built and returns the record: excluded nodes, verdicts,
    probes, curve, cost."""
    started = time.perf_counter()
    info = {name: {"node": name, "op": op, "role": u["role"], "head": u["node"]}
            for u in found_units for name, op in zip(u["nodes"], u["ops"])}
    curve = [{"round": 0, "added": [], "role": None, "float_nodes": 0, "after": measured, "error": error,
              "passed": all(v["passed"] for v in found), "kept": True, "p50_ms_b1": None}]
    record = {"excluded": [], "found": found, "curve": curve, "probes": [], "stopped": None, "info": info,
              "budget_nodes": int(config.max_excluded_fraction * len(info)), "changed_nodes": len(info)}
    if curve[0]["passed"]:
        return record
    if not config.enabled:
        record["stopped"] = "fallback disabled"
        return record

    hooks.keep(0)
    probe_base = hooks.probe([])
    probes = _probe_all(config, found_units, noise, hooks, probe_base)
    record["probes"] = [{"role": p["role"], "nodes": len(p["nodes"]),
                         "node": p["heads"][0] if len(p["heads"]) == 1 else None,
                         "impact": p["impact"], "error": p["error"]} for p in probes]
    record["probe_error"] = probe_base
    record["cost"] = {"probes": len(probes) + 1, "probe_seconds": round(time.perf_counter() - started, 1)}
    single = {p["heads"][0]: p["impact"] for p in probes if len(p["heads"]) == 1}
    excluded, stopped = _greedy(config, found_units, [p for p in probes if p["impact"] > 0], single, hooks, record)
    if stopped is None and config.trim:
        excluded = _trim(config, excluded, hooks, record)
    if config.time_rounds:  # every kept round's model, side by side at the end: the same load for all
        progress.update("fallback: timing each round's model side by side")
        timed = hooks.time([point["round"] for point in curve if point["kept"]])
        for point in curve:
            point["p50_ms_b1"] = timed.get(point["round"])
    record.update(excluded=excluded, stopped=stopped,
                  cost={**record["cost"], "rounds": len(curve) - 1, "seconds": round(time.perf_counter() - started, 1)})
    return record
