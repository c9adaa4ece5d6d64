"""Where a recipe's reports are. A passing build's report is in its bundle; a build that did not pass publishes
nothing, yet that is when its report matters most, so it is written to <artifacts>/failed/<recipe>/v<version>/
with everything measured up to the failure. `kiln report RECIPE --last` finds the newest of them all.

The engine does not know what a report says: it hands the outputs of the steps that finished, as the bundle's
step would have read them, to that step's stage (publish), which renders them (pipeline/registry.py).
"""

from __future__ import annotations

from pathlib import Path

from pipeline import registry
from pipeline.deliver import replace_folder
from pipeline.errors import BadInput
from pipeline.plan import RecipePlan, bundle_root
from pipeline.recipe import load_recipe
from pipeline.runner import RecipeOutcome, lineage
from pipeline.settings import Settings
from pipeline.store import Store


def failed_folder(settings: Settings, recipe: str, version: str) -> Path:
    return settings.failed / recipe / f"v{version}"


def write_failed_report(plan: RecipePlan, outcome: RecipeOutcome, store: Store, settings: Settings) -> Path | None:
    """Write the report of a recipe that did not pass; its report.md, or None when nothing was measured yet."""
    step = next((s for s in plan.steps if s.deliver_to is not None), None)
    if step is None:
        return None
    built = {o.step: o.key for o in outcome.steps if o.status in ("ran", "cached") and o.key}
    entries = {name: store.lookup(built[sid]) for name, sid in step.inputs.items() if sid in built}
    entries = {name: entry for name, entry in entries.items() if entry is not None}
    context = {**step.context, "upstream": {name: lineage(e) for name, e in entries.items()},
               "failure": {"status": outcome.status, "reason": outcome.reason}}
    dest = failed_folder(settings, plan.name, plan.source.version)

    def render(out: Path) -> bool:
        return registry.report_failure(step.stage, step.config, {n: e.out for n, e in entries.items()}, out, context)

    return dest / "report.md" if replace_folder(dest, render) else None


def newest_report(recipe: str, settings: Settings) -> Path:
    """The newest report.md (by modification time) of a recipe, given by name or recipe file: of its published
    bundles and its failed build reports. BadInput when it has none."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a recipe file: its name, and where it publishes
        loaded = load_recipe(path)
        name, bundles = loaded.name, bundle_root(loaded, path, settings) / loaded.name
    else:
        name, bundles = recipe, settings.bundles / recipe
    # hidden folders are deliveries in progress or left by a killed run
    found = [folder / "report.md" for root in (bundles, settings.failed / name) if root.is_dir()
             for folder in root.iterdir() if not folder.name.startswith(".")]
    found = [report for report in found if report.is_file()]
    if not found:
        raise BadInput(f"{recipe}: no report of recipe {name!r} in {bundles} or {settings.failed / name}; "
                       "build it first (`kiln run RECIPE`), or check --artifacts")
    return max(found, key=lambda report: report.stat().st_mtime)
