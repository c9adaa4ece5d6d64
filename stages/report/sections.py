"""What the report says, read from a bundle manifest: what was built, from what, how it measured against the
original, and where it diverges. One list of sections, in reading order; formats.py writes it as report.md and
report.html, so both always say the same thing.

A section is {title, text?, header?, rows?, plot?}. Each helper below builds one section, or a list of them when
there may be none (the manifest has no such measurement) or several (one per output or target)."""

from __future__ import annotations


def sections(manifest: dict) -> list[dict]:
    """[{title, text?, header?, rows?, plot?}] in reading order."""
    metrics = manifest["metrics"]
    framework = metrics.get("framework") or manifest["source"].get("flavor")
    return [
        _source(manifest, framework),
        *_failure(manifest.get("failure")),
        _parity(metrics),
        *_shape_sweep(metrics),
        *_task(metrics),
        *_task_parity(metrics),
        _latency(metrics, framework),
        *_error_histograms(metrics),
        *_variants(manifest.get("variants") or [], published="failure" not in manifest),
        *_tuning_sections(manifest.get("tuning") or {}),
        *_localization(metrics.get("localization") or {}),
        _gates(manifest["gates"]),
        *_serving(manifest.get("serving") or {}),
        _build_steps(manifest["steps"]),
        _files(manifest),
    ]


def _source(manifest: dict, framework: str | None) -> dict:
    source, metrics = manifest["source"], manifest["metrics"]
    return {"title": "Source", "text": [
        f"`{source['requested_uri']}` → `{source['uri']}` (run `{source.get('run_id')}`, {framework} "
        f"{source.get('framework_version') or ''})",
        f"recipe sha256 `{manifest['recipe']['sha256'][:16]}…`, kiln {manifest['kiln_version']}, built "
        f"{manifest['built_at']} on {manifest['environment'].get('machine')} / Python {manifest['environment'].get('python')}",
        f"validation: {metrics['samples']} samples, {metrics['threads']} threads, original = {framework}, "
        f"candidate = ONNX Runtime",
    ]}


def _failure(failure: dict | None) -> list[dict]:
    """A failed build's report: why it failed, and why parts of a bundle's report are missing."""
    if failure is None:
        return []
    return [{"title": "Why this build failed", "text": [
        f"**{failure['status'].replace('_', ' ')}**: {failure['reason']}",
        "Nothing was published. This report holds what was measured before the failure; the steps after it "
        "did not run, so their sections are absent.",
    ]}]


def _parity(metrics: dict) -> dict:
    rows = []
    for name, o in metrics["outputs"].items():
        rows.append([name, "x".join(map(str, o["shape"])), o.get("dtype"), o.get("max_abs_error"),
                     o.get("mean_abs_error"), o.get("p99_abs_error"), o.get("max_rel_error"), o.get("cosine"),
                     o.get("variation"), o.get("centered_cosine"), o.get("error_to_signal"),
                     o.get("top1_agreement"), o.get("topk_agreement"), o.get("nan", 0) + o.get("inf", 0)])
    return {"title": "Parity (candidate vs original, same inputs, same process)",
            "header": ["output", "shape", "dtype", "max abs", "mean abs", "p99 abs", "max rel", "cosine",
                       "variation", "centered cosine", "error / signal", "top-1 agree", "top-k agree", "NaN/Inf"],
            "rows": rows,
            "text": ["variation: how much the original's output varies between inputs (||original - its mean over "
                     "the samples|| / ||original||; 0 = the same output for every input, where parity proves "
                     "nothing); centered cosine and error / signal compare the candidate with the original on that "
                     "varying part (error / signal 1.0 = no better than answering the mean output for every input)"]}


def _shape_sweep(metrics: dict) -> list[dict]:
    sweep = metrics.get("shape_sweep") or []
    if not sweep:
        return []
    return [{"title": "Parity along the dynamic axes",
             "header": ["axis sizes", "output", "max abs", "cosine"],
             "rows": [[str(s["sizes"]), name, o["max_abs_error"], o["cosine"]]
                      for s in sweep for name, o in s["outputs"].items()]}]


def _task(metrics: dict) -> list[dict]:
    task = metrics.get("task")
    if not task:
        return []
    return [{"title": "Task metrics", "header": ["metric", "original", "candidate", "drop"],
             "rows": [["top-1 accuracy", task["reference"], task["candidate"], task["drop"]],
                      ["macro F1", task.get("reference_f1"), task.get("candidate_f1"), None]],
             "text": [f"{task['samples']} labeled samples, output `{task['output']}`"]}]


def _task_parity(metrics: dict) -> list[dict]:
    found = metrics.get("task_parity")
    if not found:
        return []
    return [{"title": "Task-level parity", "header": ["task", "metric", "output", "value", "compared"],
             "rows": [[found["task"], found["metric"], found["output"], found["value"],
                       f"{found['compared']} {found['unit']}"]],
             "text": ["the candidate's task result against the original's on the validation samples"
                      + (f" ({found['distinct_labels']} distinct labels among the original's)"
                         if "distinct_labels" in found else "")]}]


def _latency(metrics: dict, framework: str | None) -> dict:
    rows = []
    for batch, t in metrics["latency"].items():
        for runtime in ("original", "onnxruntime"):
            s = t[runtime]
            met = s.get("ci_target_met")
            rows.append([batch, framework if runtime == "original" else runtime, s["p50_ms"],
                         f"±{s.get('p50_ci_ms', 0):.3g}", s["p95_ms"],
                         "–" if s.get("p95_ci_ms") is None else f"±{s['p95_ci_ms']:.3g}", s["p99_ms"],
                         s["throughput_per_s"], s.get("peak_rss_mb"),
                         f"{s['iterations']}" + ("" if met is None or met else " (budget used before target_ci)")])
        rows.append([batch, "**speedup (p50)**", f"{t['speedup_p50']:.2f}x", "", "", "", "", "", "", ""])
    return {"title": "Latency (ms per call; warm blocks, re-warmed after every switch, until known to target_ci)",
            "header": ["batch", "runtime", "p50", "p50 95% CI", "p95", "p95 95% CI", "p99", "items/s",
                       "peak RSS MB", "runs"],
            "rows": rows, "plot": "latency"}


def _error_histograms(metrics: dict) -> list[dict]:
    return [{"title": f"Error histogram: {name}", "plot": f"errors-{name}"} for name in metrics["outputs"]]


def _variants(variants: list[dict], published: bool) -> list[dict]:
    """The precision variant table, and each variant's fallback rounds and quantization settings under it."""
    if not variants:
        return []
    chosen = "published" if published else "selected"  # a failed build published nothing
    batches = list(variants[0]["p50_ms"])
    rows = []
    for v in variants:
        rows.append([f"**{v['name']}** ({chosen})" if v["selected"] else v["name"], v["kind"], v["bytes"],
                     v["cosine"], v.get("error_to_signal"), v["max_abs_error"], v["accuracy"],
                     *[v["p50_ms"][b] for b in batches], *[f"{v['speedup'][b]:.2f}x" for b in batches],
                     "pass" if v["passed"] else "**FAIL**"])
    return [{"title": "Precision variants (vs the original framework)",
             "header": ["variant", "kind", "bytes", "cosine", "error / signal", "max abs", "accuracy",
                        *[f"p50 ms b{b}" for b in batches], *[f"speedup b{b}" for b in batches], "gates"],
             "rows": rows, "text": [line for v in variants for line in _variant_notes(v)]}]


def _variant_notes(v: dict) -> list[str]:
    """The fallback curve (each round: what went back to float, the error after it, its model's b1 latency), what
    the probes and rounds cost, and why the search stopped."""
    text = []
    fallback = v.get("fallback") or {}
    for point in fallback.get("curve") or []:
        if point["round"] == 0:
            text.append(f"{v['name']} fallback curve: round 0, everything quantized: {_after(point)}")
            continue
        if point.get("removed"):  # the trim, once the gates passed
            nodes = ", ".join(f"`{n['node']}` ({n['op']})" for n in point["removed"])
            verdict = "still passes: stays quantized" if point["kept"] else "fails without it: back to float"
            text.append(f"{v['name']} fallback round {point['round']}: quantize {point['role']} again: {nodes} → "
                        f"{_after(point)}: {verdict}")
            continue
        nodes = ", ".join(f"`{n['node']}` ({n['op']})" for n in point["added"])
        verdict = "passes" if point["passed"] else "kept (helps)" if point["kept"] else "undone (no help)"
        text.append(f"{v['name']} fallback round {point['round']}: float {point['role']}: {nodes} "
                    f"({point['float_nodes']} in float) → {_after(point)}: {verdict}")
    cost = fallback.get("cost")
    if cost:
        text.append(f"{v['name']} fallback cost: {cost['probes']} probes ({cost['probe_seconds']} s), "
                    f"{cost['rounds']} rounds, {cost['seconds']} s in all")
    if fallback.get("stopped"):
        text.append(f"{v['name']} fallback stopped: {fallback['stopped']}")
    if v["reduce_range"] is not None:
        text.append(f"{v['name']}: reduce_range {v['reduce_range']}"
                    + (f", calibration sha256 `{v['calibration_sha256'][:16]}…`" if v.get("calibration_sha256") else ""))
    return text


def _after(point: dict) -> str:
    parts = [f"error/variation {point['error']:.2e}"]
    for name, m in (point.get("after") or {}).items():
        if isinstance(m, dict):
            cosine = m.get("mean_row_cosine") if m.get("mean_row_cosine") is not None else m.get("cosine")
            parts.append(f"{name} cosine {cosine:.5f}")
        else:
            parts.append(f"{name} {m:.4f}")
    if point.get("p50_ms_b1") is not None:
        parts.append(f"p50 b1 {point['p50_ms_b1']:.2f} ms")
    return ", ".join(parts)


def _tuning_sections(tuning: dict) -> list[dict]:
    """Per hardware target: every candidate measured, the Pareto front and the winner, or why it was skipped."""
    out = []
    for target, record in tuning.items():
        title = f"Tuning for `{target}` ({record['provider']})"
        if record.get("skipped"):
            out.append({"title": title, "text": [f"skipped: {record['skipped']}"]})
            continue
        batches = [str(b) for b in record["batch_sizes"]]
        rows = []
        for c in sorted(record["candidates"], key=lambda c: (c["objective"] is None, c["objective"] or 0)):
            error = c.get("error") or {}
            lat = c.get("latency") or {}
            verdict = ("**winner**" if c["winner"] else "pareto" if c["pareto"] else "") if c["passed"] \
                else f"fails: {c['reason']}"
            fusion = c["fusion"]["level"] + (" + " + c["fusion"]["transformer"]["model_type"] if c["fusion"].get("transformer") else "")
            size = round(c["bytes"] / 2**20, 2) if c["bytes"] is not None else None
            if c.get("note"):
                verdict += f" ({c['note']})"
            if c.get("float_nodes"):
                verdict += f" (fallback: {c['float_nodes']} node(s) in float)"
            rows.append([c["candidate"], c["exporter"], fusion, c["precision"], size,
                         error.get("mean_cosine"), error.get("max_abs_error"),
                         *[lat.get(b, {}).get("p50_ms") for b in batches], *[lat.get(b, {}).get("p95_ms") for b in batches],
                         c["objective"], c.get("measured"), verdict])
        winner = record["winner"]
        opts = winner["measured_with"]
        machine = record["machine"]
        text = [
            f"objective: {record['objective']} (geometric mean over batch sizes {', '.join(batches)}), lower is "
            f"better; constraint: the parity gates of each candidate's precision. Each row shows its candidate's "
            f"figures from the final (side by side with the winner) where it reached it, else from its own trial",
            f"winner `{winner['candidate']}`: {opts['providers'][0]}"
            f"{' ' + str(opts['provider_options'][0]) if opts['provider_options'][0] else ''}, "
            f"{opts['session_options']['intra_op_num_threads']} intra-op threads, "
            f"{opts['session_options']['execution_mode']}, {opts['session_options']['graph_optimization_level']}"
            f"{'' if opts['session_options']['graph_optimization_level'] == 'ORT_DISABLE_ALL' else ' (baked into the model)'}"
            f", IO binding {opts['io_binding']} → `targets/{target}/`",
            f"machine: {machine['cpu']}, {machine['cores']} cores, ISA {', '.join(machine['isa']) or '-'}, "
            f"GPUs {', '.join(machine['gpus']) or 'none'}, providers {', '.join(machine['providers'])}",
            f"budget: {record['budget']['trials']} trials in {record['budget']['seconds']} s"
            + (f", stopped: {record['budget']['stopped']}" if record["budget"]["stopped"] else ""),
        ]
        load = record.get("load_average")
        if load:
            text.append(f"load average while timing: {load['before']} → {load['after']} on {machine['cores']} cores"
                        + (" — **busy**: other work competed with the trials, which favours settings that suit that "
                           "moment (e.g. fewer threads); tune again on a quiet machine" if load["busy"] else ""))
        out.append({"title": title, "text": text, "rows": rows,
                    "header": ["candidate", "exporter", "fusion", "precision", "MB", "mean cosine", "max abs",
                               *[f"p50 ms b{b}" for b in batches], *[f"p95 ms b{b}" for b in batches],
                               "objective ms", "timed in", "result"]})
    return out



def _localization(loc: dict) -> list[dict]:
    if loc.get("available"):
        first = loc.get("first_divergent")
        verdict = (f"first divergent layer: **{first['layer']}** ({first['type']}), relative error "
                   f"{first['relative_error']:.3g} at ONNX node `{first['onnx_node']}`" if first else
                   f"no layer diverges beyond relative error {loc['tolerance']} "
                   f"({loc['layers_matched']} of {loc['layers_in_model']} layers matched)")
        return [{"title": "Per-layer comparison (original layers vs exported ONNX tensors)",
                 "text": [verdict], "plot": "layers",
                 "header": ["layer", "type", "ONNX tensor", "shape", "max abs", "relative"],
                 "rows": [[layer["layer"], layer["type"], layer["onnx_tensor"], "x".join(map(str, layer["shape"])),
                           layer["max_abs_error"], layer["relative_error"]] for layer in loc["layers"]]}]
    if loc:
        return [{"title": "Per-layer comparison", "text": [f"not available: {loc.get('reason')}"]}]
    return []


def _gates(gates: dict) -> dict:
    if not gates["verdicts"]:  # a failed build that stopped before its gate
        return {"title": "Gates", "text": ["not judged: the build stopped before the gates ran"]}
    return {"title": "Gates", "header": ["gate", "subject", "value", "threshold", "result"],
            "rows": [[v["gate"], v["subject"], v["value"] if not isinstance(v["value"], list) else str(v["value"]),
                      str(v["threshold"]), "pass" if v["passed"] else "**FAIL**: " + v["message"]]
                     for v in gates["verdicts"]]}


def _serving(serving: dict) -> list[dict]:
    if not serving:
        return []
    return [{"title": "Serving targets", "header": ["target", "result"],
             "rows": [[t, f"skipped: {s['skipped']}" if s.get("skipped") else f"serving/{t}/"]
                      for t, s in serving.items()]}]


def _build_steps(steps: list[dict]) -> dict:
    rows = []
    for step in steps:
        summary = step.get("summary") or {}
        notes = ""
        if step["stage"] == "export":
            notes = f"{summary.get('exporter')} opset {summary.get('opset')}, {summary.get('nodes')} nodes"
        elif step["stage"] == "optimize":
            fused = ", ".join(f"{k} {v}" for k, v in (summary.get("fusions") or {}).items()) or "no fusions"
            notes = f"level {summary.get('level')}, nodes {summary.get('nodes_before')} → {summary.get('nodes_after')}; {fused}"
        elif step["stage"] == "data":  # the dtype casts the data needed (e.g. float64 samples for a float32 model)
            notes = f"{summary.get('samples')} samples from {summary.get('source')}" + "".join(
                f"; {note}" for note in summary.get("notes") or [])
        rows.append([step["stage"], f"`{step['key'][:12]}`", step.get("seconds"), notes])
    return {"title": "Build steps", "header": ["stage", "key", "seconds", "notes"], "rows": rows}


def _files(manifest: dict) -> dict:
    return {"title": "Files", "header": ["file", "bytes", "sha256"],
            "rows": [[f"`{p}`", f["bytes"], f"`{f['sha256'][:16]}…`"] for p, f in manifest["files"].items()],
            "text": ["Tools: " + ", ".join(f"{k} {v}" for k, v in manifest["tools"].items() if v) + "."]}
