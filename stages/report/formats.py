"""The report's sections written out: report.md (Markdown, plots linked) and report.html (one self-contained page,
plots embedded as data URIs). Both walk the same `sections(manifest)`, so they always say the same thing."""

from __future__ import annotations

import base64
import html

from stages.report.sections import sections


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _title(manifest: dict) -> tuple[str, bool]:
    source = manifest["source"]
    failure = manifest.get("failure")  # a failed build's report: its title says why, before anything else
    passed = manifest["gates"]["passed"] and failure is None
    verdict = "PASSED" if passed else "FAILED"
    if failure is not None:
        verdict += f" ({failure['status'].replace('_', ' ')}): {failure['reason']}"
    return f"{manifest['recipe']['name']} — {source['name']} v{source['version']}: {verdict}", passed


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


def _banner(manifest: dict, passed: bool) -> str:
    if passed:
        return "All gates passed"
    return "A gate failed" if "failure" not in manifest else "The build failed: nothing was published"


def render_html(manifest: dict, plots: dict[str, bytes]) -> str:
    """One self-contained file: plots are embedded as data URIs."""
    title, passed = _title(manifest)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<div class='banner {'pass' if passed else 'fail'}' id='verdict'>{_banner(manifest, passed)}</div>"]
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
