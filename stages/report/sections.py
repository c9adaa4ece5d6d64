"""report.md and report.html from a bundle manifest: what was built, from what, how it measured against the
original, and where it diverges. Both come from one list of sections, so they always say the same thing."""

from __future__ import annotations

import base64
import html


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def sections(manifest: dict) -> list[dict]:
    """[{title, text?, header?, rows?, plot?}] in reading order."""
    source, metrics, gates = manifest["source"], manifest["metrics"], manifest["gates"]
    framework = metrics.get("framework") or source.get("flavor")
    out: list[dict] = []
    out.append({"title": "Source", "text": [
        f"`{source['requested_uri']}` → `{source['uri']}` (run `{source.get('run_id')}`, {framework} "
        f"{source.get('framework_version') or ''})",
        f"recipe sha256 `{manifest['recipe']['sha256'][:16]}…`, kiln {manifest['kiln_version']}, built "
        f"{manifest['built_at']} on {manifest['environment'].get('machine')} / Python {manifest['environment'].get('python')}",
        f"validation: {metrics['samples']} samples, {metrics['threads']} threads, original = {framework}, "
        f"candidate = ONNX Runtime",
    ]})
    rows = []
    for name, o in metrics["outputs"].items():
        rows.append([name, "x".join(map(str, o["shape"])), o.get("dtype"), o.get("max_abs_error"),
                     o.get("mean_abs_error"), o.get("p99_abs_error"), o.get("max_rel_error"), o.get("cosine"),
                     o.get("top1_agreement"), o.get("topk_agreement"), o.get("nan", 0) + o.get("inf", 0)])
    out.append({"title": "Parity (candidate vs original, same inputs, same process)",
                "header": ["output", "shape", "dtype", "max abs", "mean abs", "p99 abs", "max rel", "cosine",
                           "top-1 agree", "top-k agree", "NaN/Inf"], "rows": rows})
    sweep = metrics.get("shape_sweep") or []
    if sweep:
        out.append({"title": "Parity along the dynamic axes",
                    "header": ["axis sizes", "output", "max abs", "cosine"],
                    "rows": [[str(s["sizes"]), name, o["max_abs_error"], o["cosine"]]
                             for s in sweep for name, o in s["outputs"].items()]})
    task = metrics.get("task")
    if task:
        out.append({"title": "Task metrics", "header": ["metric", "original", "candidate", "drop"],
                    "rows": [["top-1 accuracy", task["reference"], task["candidate"], task["drop"]],
                             ["macro F1", task.get("reference_f1"), task.get("candidate_f1"), None]],
                    "text": [f"{task['samples']} labeled samples, output `{task['output']}`"]})
    rows = []
    for batch, t in metrics["latency"].items():
        for runtime in ("original", "onnxruntime"):
            s = t[runtime]
            rows.append([batch, framework if runtime == "original" else runtime, s["p50_ms"],
                         f"±{s.get('p50_ci_ms', 0):.3g}", s["p95_ms"], s["p99_ms"], s["throughput_per_s"],
                         s.get("peak_rss_mb"), s["iterations"]])
        rows.append([batch, "**speedup (p50)**", f"{t['speedup_p50']:.2f}x", "", "", "", "", "", ""])
    out.append({"title": "Latency (ms per call; interleaved rounds after warm-up)",
                "header": ["batch", "runtime", "p50", "p50 95% CI", "p95", "p99", "items/s", "peak RSS MB", "runs"],
                "rows": rows, "plot": "latency"})
    for name in metrics["outputs"]:
        out.append({"title": f"Error histogram: {name}", "plot": f"errors-{name}"})
    variants = manifest.get("variants") or []
    if variants:
        batches = list(variants[0]["p50_ms"])
        rows = []
        for v in variants:
            rows.append([("**" + v["name"] + "** (published)") if v["selected"] else v["name"], v["kind"], v["bytes"],
                         v["cosine"], v["max_abs_error"], v["accuracy"],
                         *[v["p50_ms"][b] for b in batches], *[f"{v['speedup'][b]:.2f}x" for b in batches],
                         "pass" if v["passed"] else "**FAIL**"])
        text = []
        for v in variants:
            fallback = v.get("fallback") or {}
            for index, round_ in enumerate(fallback.get("rounds") or [], 1):
                nodes = ", ".join(f"`{r['node']}` ({r['op']}, SQNR {r['sqnr_db']} dB, adds {r['added_noise']:.2e} "
                                  "relative noise power)" for r in round_["excluded"])
                after = ", ".join(f"{k} cosine {m['cosine']:.6f}" if isinstance(m, dict) else f"{k} {m:.4f}"
                                  for k, m in round_["after"].items())
                verdict = "passes" if round_["passed"] else "kept (helps)" if round_.get("kept") else "reverted (no help)"
                text.append(f"{v['name']} fallback round {index}: float {nodes} → {after}: {verdict}")
            if fallback.get("stopped"):
                text.append(f"{v['name']} fallback stopped: {fallback['stopped']}")
            if v["reduce_range"] is not None:
                text.append(f"{v['name']}: reduce_range {v['reduce_range']}"
                            + (f", calibration sha256 `{v['calibration_sha256'][:16]}…`" if v.get("calibration_sha256") else ""))
        out.append({"title": "Precision variants (vs the original framework)",
                    "header": ["variant", "kind", "bytes", "cosine", "max abs", "accuracy",
                               *[f"p50 ms b{b}" for b in batches], *[f"speedup b{b}" for b in batches], "gates"],
                    "rows": rows, "text": text})
    out += _tuning_sections(manifest.get("tuning") or {})
    loc = metrics.get("localization") or {}
    if loc.get("available"):
        first = loc.get("first_divergent")
        verdict = (f"first divergent layer: **{first['layer']}** ({first['type']}), relative error "
                   f"{first['relative_error']:.3g} at ONNX node `{first['onnx_node']}`" if first else
                   f"no layer diverges beyond relative error {loc['tolerance']} "
                   f"({loc['layers_matched']} of {loc['layers_in_model']} layers matched)")
        out.append({"title": "Per-layer comparison (original layers vs exported ONNX tensors)",
                    "text": [verdict], "plot": "layers",
                    "header": ["layer", "type", "ONNX tensor", "shape", "max abs", "relative"],
                    "rows": [[layer["layer"], layer["type"], layer["onnx_tensor"], "x".join(map(str, layer["shape"])),
                              layer["max_abs_error"], layer["relative_error"]] for layer in loc["layers"]]})
    elif loc:
        out.append({"title": "Per-layer comparison", "text": [f"not available: {loc.get('reason')}"]})
    out.append({"title": "Gates", "header": ["gate", "subject", "value", "threshold", "result"],
                "rows": [[v["gate"], v["subject"], v["value"] if not isinstance(v["value"], list) else str(v["value"]),
                          str(v["threshold"]), "pass" if v["passed"] else "**FAIL**: " + v["message"]]
                         for v in gates["verdicts"]]})
    serving = manifest.get("serving") or {}
    if serving:
        out.append({"title": "Serving targets", "header": ["target", "result"],
                    "rows": [[t, f"skipped: {s['skipped']}" if s.get("skipped") else f"serving/{t}/"]
                             for t, s in serving.items()]})
    rows = []
    for step in manifest["steps"]:
        summary = step.get("summary") or {}
        notes = ""
        if step["stage"] == "export":
            notes = f"{summary.get('exporter')} opset {summary.get('opset')}, {summary.get('nodes')} nodes"
        elif step["stage"] == "optimize":
            fused = ", ".join(f"{k} {v}" for k, v in (summary.get("fusions") or {}).items()) or "no fusions"
            notes = f"level {summary.get('level')}, nodes {summary.get('nodes_before')} → {summary.get('nodes_after')}; {fused}"
        rows.append([step["stage"], f"`{step['key'][:12]}`", step.get("seconds"), notes])
    out.append({"title": "Build steps", "header": ["stage", "key", "seconds", "notes"], "rows": rows})
    out.append({"title": "Files", "header": ["file", "bytes", "sha256"],
                "rows": [[f"`{p}`", f["bytes"], f"`{f['sha256'][:16]}…`"] for p, f in manifest["files"].items()],
                "text": ["Tools: " + ", ".join(f"{k} {v}" for k, v in manifest["tools"].items() if v) + "."]})
    return out


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
            rows.append([c["candidate"], c["exporter"], fusion, c["precision"], size,
                         error.get("mean_cosine"), error.get("max_abs_error"),
                         *[lat.get(b, {}).get("p50_ms") for b in batches], *[lat.get(b, {}).get("p95_ms") for b in batches],
                         c["objective"], verdict])
        winner = record["winner"]
        opts = winner["measured_with"]
        machine = record["machine"]
        text = [
            f"objective: {record['objective']} (geometric mean over batch sizes {', '.join(batches)}), lower is "
            f"better; constraint: the parity gates of each candidate's precision",
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
                               "objective ms", "result"]})
    return out


def _title(manifest: dict) -> tuple[str, bool]:
    source = manifest["source"]
    passed = manifest["gates"]["passed"]
    return f"{manifest['recipe']['name']} — {source['name']} v{source['version']}: {'PASSED' if passed else 'FAILED'}", passed


def render_report(manifest: dict, plots: dict[str, str] | None = None) -> str:
    """Markdown; `plots` maps a plot name to its file path relative to the report."""
    plots = plots or {}
    title, _ = _title(manifest)
    lines = [f"# {title}", ""]
    for section in sections(manifest):
        if section["title"] == "Source":
            lines += [f"- {t}" for t in section["text"]] + [""]
            continue
        if section.get("plot") and section["plot"] not in plots and not section.get("rows") and not section.get("text"):
            continue
        lines += [f"## {section['title']}", ""]
        lines += [t + "\n" for t in section.get("text", [])]
        if section.get("rows"):
            lines.append("| " + " | ".join(section["header"]) + " |")
            lines.append("|" + "---|" * len(section["header"]))
            lines += ["| " + " | ".join(_num(c) for c in row) + " |" for row in section["rows"]]
            lines.append("")
        if section.get("plot") in plots:
            lines += [f"![{section['title']}]({plots[section['plot']]})", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:70rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.85rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;
text-align:left}th{background:#f3f3f3}.banner{padding:.6rem 1rem;border-radius:.3rem;color:#fff;font-weight:600}
.pass{background:#2e7d32}.fail{background:#c62828}img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6}"""


def _inline(text: str) -> str:
    """The little markdown the sections use (**bold**, `code`) as HTML."""
    import re

    escaped = html.escape(str(text))
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def render_html(manifest: dict, plots: dict[str, bytes]) -> str:
    """One self-contained file: plots are embedded as data URIs."""
    title, passed = _title(manifest)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<div class='banner {'pass' if passed else 'fail'}' id='verdict'>{'All gates passed' if passed else 'A gate failed'}</div>"]
    for section in sections(manifest):
        plot = plots.get(section.get("plot") or "")
        if section.get("plot") and not plot and not section.get("rows") and not section.get("text"):
            continue
        parts.append(f"<h2>{html.escape(section['title'])}</h2>")
        parts += [f"<p>{_inline(t)}</p>" for t in section.get("text", [])]
        if plot:
            encoded = base64.b64encode(plot).decode()
            parts.append(f"<img class='plot' id='plot-{html.escape(section['plot'])}' alt='{html.escape(section['title'])}' "
                         f"src='data:image/png;base64,{encoded}'>")
        if section.get("rows"):
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in section["header"]) + "</tr>")
            for row in section["rows"]:
                parts.append("<tr>" + "".join(f"<td>{_inline(_num(c))}</td>" for c in row) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
