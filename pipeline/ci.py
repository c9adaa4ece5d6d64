"""`kiln ci`: build the recipes a model version affects and report for CI systems (JUnit XML, Markdown)."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from pipeline.runner import RunSummary


def junit_xml(summary: RunSummary) -> str:
    failures = sum(1 for r in summary.recipes if r.status == "gate_failed")
    errors = sum(1 for r in summary.recipes if r.status not in ("passed", "gate_failed"))
    suite = ET.Element("testsuite", name="kiln", tests=str(len(summary.recipes)), failures=str(failures),
                       errors=str(errors), time=f"{summary.seconds:.3f}")
    for outcome in summary.recipes:
        seconds = sum(s.seconds for s in outcome.steps)
        case = ET.SubElement(suite, "testcase", classname="kiln.recipe", name=f"{outcome.recipe} ({outcome.source} v{outcome.version})",
                             time=f"{seconds:.3f}")
        if outcome.status == "gate_failed":
            ET.SubElement(case, "failure", message=outcome.reason or "", type="gate_failed").text = outcome.reason
        elif outcome.status != "passed":
            ET.SubElement(case, "error", message=outcome.reason or "", type=outcome.status).text = outcome.reason
        else:
            ET.SubElement(case, "system-out").text = f"bundle: {outcome.bundle}"
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)


def markdown(summary: RunSummary) -> str:
    lines = ["# kiln build", "", "| recipe | source | version | result | steps run | bundle / reason |", "|---|---|---|---|---|---|"]
    for r in summary.recipes:
        ran = sum(1 for s in r.steps if s.status == "ran")
        detail = f"`{r.bundle}`" if r.status == "passed" else (r.reason or "").replace("|", "\\|")
        mark = "✅ passed" if r.status == "passed" else f"❌ {r.status.replace('_', ' ')}"
        lines.append(f"| {r.recipe} | `{r.source}` | {r.version} | {mark} | {ran} | {detail} |")
    lines += ["", f"Exit code {summary.exit_code}, {summary.seconds:.1f} s."]
    return "\n".join(lines) + "\n"
