"""One build of a set of recipes: plan them against their registries, run them, write each failed recipe's report
under <artifacts>/failed/ and record the failure in the registry when write-back is on. `kiln run`, `kiln ci`,
`kiln watch` and the webhook receiver all build through here."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.errors import BadInput, RecipeError
from pipeline.executor import Executor, InlineExecutor, LocalProcessExecutor
from pipeline.plan import RecipePlan, plan_recipe
from pipeline.runner import Runner, RunSummary
from pipeline.settings import Settings


def recipe_files(paths) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not found:
                raise RecipeError(f"{path}: folder holds no *.yaml recipes")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise RecipeError(f"{path}: no such recipe file")
    return files


def plan_all(paths, settings: Settings, model: str | None = None, version: str | None = None) -> list[RecipePlan]:
    """Plans for the recipes under paths; with `model` (and `version`), only those whose source resolves to it."""
    from pipeline.mlflow_registry import resolve
    from pipeline.recipe import load_recipe, parse_model_uri
    from pipeline.versions import check_onnxruntime_install

    check_onnxruntime_install()
    recipes = [(path, load_recipe(path)) for path in recipe_files(paths)]
    names = [r.name for _, r in recipes]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise RecipeError(f"name: recipes share the name {duplicated[0]!r}; names must be unique in one run")
    plans = []
    for path, recipe in recipes:
        if model is not None and parse_model_uri(recipe.source.uri)[0] != model:
            continue
        source = resolve(recipe.source.uri, settings.tracking_uri(recipe.source.tracking_uri))
        if version is not None and source.version != str(version):
            continue
        plans.append(plan_recipe(recipe, path, source, settings))
    return plans


def build(plans: list[RecipePlan], settings: Settings, executor: str | None = None, jobs: int | None = None,
          on_event: Callable | None = None, warn: Callable[[str], None] = print) -> RunSummary:
    from pipeline.reports import write_failed_report
    from pipeline.writeback import record_failure

    # Unless given here, where steps run comes from the settings (so `watch` and `ci` builds use it too).
    executor = make_executor(executor or settings.executor, jobs or settings.jobs, settings.store_url)

    def events(kind, outcome):
        if kind == "evicted":  # said by every kind of build (run, ci, watch, webhook), on the warning channel
            warn(f"kiln store: {outcome.step}: cached {outcome.evicted} does not match its recorded sha256; "
                 "entry evicted, building it again")
        if on_event is not None:
            on_event(kind, outcome)

    runner = Runner(settings, executor, events)
    summary = runner.run(plans)
    by_name = {p.name: p for p in plans}
    for outcome in summary.recipes:
        if outcome.status == "passed":
            continue
        plan = by_name[outcome.recipe]
        # The report first: its headline is the failure's own reason, without the registry's run id.
        try:
            report = write_failed_report(plan, outcome, runner.store, settings)
            outcome.report = str(report) if report else None
        except Exception as exc:  # noqa: BLE001 - the build result stands either way
            warn(f"kiln: {outcome.recipe}: could not write the failed build's report: {exc}")
        try:
            run_id = record_failure(plan, outcome, runner.store)
            if run_id:
                outcome.reason = f"{outcome.reason} (recorded on run {run_id})"
        except Exception as exc:  # noqa: BLE001 - the build result stands either way
            warn(f"kiln: {outcome.recipe}: could not record the failure in the registry: {exc}")
    return summary


def make_executor(name: str, jobs: int, store_url: str | None = None) -> Executor:
    if name == "local":
        return LocalProcessExecutor(jobs)
    if name == "inline":
        return InlineExecutor()
    if name == "ray" or name.startswith("ray="):
        from pipeline.ray_executor import RayExecutor  # imports ray only now

        try:
            return RayExecutor(name.partition("=")[2] or None, jobs, store_url)
        except ImportError as exc:
            raise BadInput(f"--executor {name}: Ray is not installed ({exc}); pip install 'modelkiln[ray]'") from None
    raise BadInput(f"--executor {name}: unknown executor (known: local, inline, ray, ray=ADDRESS)")
