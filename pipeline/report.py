"""report.md from a bundle manifest: what was built, from what, and how it measured against the original."""

from __future__ import annotations


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(c) for c in row) + " |" for row in rows]
    return lines + [""]


def render_report(manifest: dict) -> str:
    source, metrics, gates = manifest["source"], manifest["metrics"], manifest["gates"]
    framework = metrics.get("framework") or source.get("flavor")
    verdict = "PASSED" if gates["passed"] else "FAILED"
    lines = [
        f"# {manifest['recipe']['name']} — {source['name']} v{source['version']}: {verdict}",
        "",
        f"- source: `{source['requested_uri']}` → `{source['uri']}` (run `{source.get('run_id')}`, {framework} "
        f"{source.get('framework_version') or ''})",
        f"- recipe sha256: `{manifest['recipe']['sha256'][:16]}…`, kiln {manifest['kiln_version']}, "
        f"built {manifest['built_at']}",
        f"- validation: {metrics['samples']} samples, {metrics['threads']} threads, original = {framework}, "
        f"candidate = ONNX Runtime",
        "",
        "## Parity (candidate vs original, same inputs, same process)",
        "",
    ]
    rows = []
    for name, o in metrics["outputs"].items():
        rows.append([name, "x".join(map(str, o["shape"])), o.get("max_abs_error"), o.get("mean_abs_error"),
                     o.get("p99_abs_error"), o.get("max_rel_error"), o.get("cosine"), o.get("top1_agreement"),
                     o.get("nan", 0) + o.get("inf", 0)])
    lines += _table(["output", "shape", "max abs", "mean abs", "p99 abs", "max rel", "cosine", "top-1 agree",
                     "NaN/Inf"], rows)
    task = metrics.get("task")
    if task:
        lines += [f"Task metric ({task['metric']} on {task['samples']} labeled samples, output `{task['output']}`): "
                  f"original {task['reference']:.4f}, candidate {task['candidate']:.4f}, drop {task['drop']:.4f}", ""]
    lines += ["## Latency (ms per call; interleaved rounds after warm-up)", ""]
    rows = []
    for batch, t in metrics["latency"].items():
        for runtime in ("original", "onnxruntime"):
            s = t[runtime]
            rows.append([batch, framework if runtime == "original" else runtime, s["p50_ms"], s["p95_ms"],
                         s["p99_ms"], s["throughput_per_s"], s["iterations"]])
        rows.append([batch, "**speedup (p50)**", f"{t['speedup_p50']:.2f}x", "", "", "", ""])
    lines += _table(["batch", "runtime", "p50", "p95", "p99", "items/s", "runs"], rows)
    lines += ["## Gates", ""]
    lines += _table(
        ["gate", "subject", "value", "threshold", "result"],
        [[v["gate"], v["subject"], v["value"] if not isinstance(v["value"], list) else str(v["value"]),
          str(v["threshold"]), "pass" if v["passed"] else "**FAIL**: " + v["message"]] for v in gates["verdicts"]],
    )
    lines += ["## Build steps", ""]
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
    lines += _table(["stage", "key", "seconds", "notes"], rows)
    lines += ["## Files", ""]
    lines += _table(["file", "bytes", "sha256"],
                    [[f"`{p}`", f["bytes"], f"`{f['sha256'][:16]}…`"] for p, f in manifest["files"].items()])
    tools = ", ".join(f"{k} {v}" for k, v in manifest["tools"].items() if v)
    lines += [f"Tools: {tools}.", ""]
    return "\n".join(lines)
