"""The bundle's report, for the publish stage: `render(manifest, images)` gives report.md and report.html.

    sections.py  what the report says: one list of sections read from the manifest (parity, latency, variants,
                 tuning, per-layer comparison, gates, ...), one helper per section
    formats.py   those sections as Markdown and as HTML, so both files always say the same thing
    plots.py     its pictures as PNG bytes (matplotlib, headless)

It lives beside the stages, not in the engine, because it reads what the stages measured in their own layouts.
"""

from __future__ import annotations

from stages.report.formats import render_html, render_report


def render(manifest: dict, images: dict[str, bytes]) -> dict[str, str]:
    """{file name: text} for the bundle's root. report.md links each image as `plots/<name>.png` (the caller writes
    them there); report.html embeds them, so it is one self-contained file."""
    return {
        "report.md": render_report(manifest, {name: f"plots/{name}.png" for name in images}),
        "report.html": render_html(manifest, images),
    }
