"""The `kiln` command line. Exit codes: 0 passed, 1 a gate failed, 2 bad input (recipe, URI, model), 3 other."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click

from pipeline.errors import BadInput, KilnError, RecipeError
from pipeline.settings import Settings, quiet_environment


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _recipe_files(paths: tuple[str, ...]) -> list[Path]:
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


def _plans(paths: tuple[str, ...], settings: Settings):
    from pipeline.mlflow_registry import resolve
    from pipeline.plan import plan_recipe
    from pipeline.recipe import load_recipe

    from pipeline.versions import check_onnxruntime_install

    check_onnxruntime_install()
    recipes = [(path, load_recipe(path)) for path in _recipe_files(paths)]
    names = [r.name for _, r in recipes]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise RecipeError(f"name: recipes share the name {duplicated[0]!r}; names must be unique in one run")
    plans = []
    for path, recipe in recipes:
        source = resolve(recipe.source.uri, settings.tracking_uri(recipe.source.tracking_uri))
        plans.append(plan_recipe(recipe, path, source, settings))
    return plans


def _guard(func):
    """Turn kiln's typed errors into one line on stderr and their exit code."""

    def wrapper(*args, **kwargs):
        quiet_environment()
        try:
            return func(*args, **kwargs)
        except KilnError as exc:
            click.echo(f"kiln: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - last resort: still one line, still a code
            log = Path(Settings.from_env().logs) / "kiln-crash.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            click.echo(f"kiln: internal error: {type(exc).__name__}: {exc} (traceback: {log})", err=True)
            sys.exit(3)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


common = [
    click.option("--artifacts", envvar="KILN_ARTIFACTS", help="Store, bundles and default registry [artifacts/]"),
    click.option("--tracking-uri", help="MLflow tracking URI; overrides the recipe and MLFLOW_TRACKING_URI"),
]


def with_common(func):
    for option in reversed(common):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="modelkiln", prog_name="kiln")
def main() -> None:
    """kiln: MLflow registry -> validated, optimized ONNX bundles."""


@main.command()
@click.argument("recipes", nargs=-1, required=True)
@with_common
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout")
@click.option("--jobs", default=1, show_default=True, help="Steps run at once (latency is measured best with 1)")
@click.option("--executor", default="local", show_default=True, help="local (worker processes) or inline")
@_guard
def run(recipes, artifacts, tracking_uri, as_json, jobs, executor) -> None:
    """Build RECIPES (files or folders): fetch, export, optimize, validate, gate, publish."""
    from pipeline.executor import make_executor
    from pipeline.runner import Runner

    settings = Settings.from_env(artifacts, tracking_uri)
    plans = _plans(recipes, settings)
    console = _console()

    def on_event(kind, outcome):
        if kind == "start":
            console.print(f"  [dim]…[/] {outcome.step:<32} running", highlight=False)
        elif kind == "done":
            mark = "[green]✓[/]" if outcome.status == "ran" else "[dim]=[/]"
            what = f"{outcome.seconds:6.2f}s" if outcome.status == "ran" else " cached"
            console.print(f"  {mark} {outcome.step:<32} {what}  [dim]{outcome.key[:12]}[/]")
        elif kind == "failed":
            console.print(f"  [red]✗[/] {outcome.step:<32} failed")

    summary = Runner(settings, make_executor(executor, jobs), on_event).run(plans)
    for result in summary.recipes:
        if result.status == "passed":
            state = "published" if result.delivered else "up to date"
            console.print(f"[green]{result.recipe}[/]: passed, {state}: {result.bundle}/  (report.md, manifest.json)")
        else:
            click.echo(f"kiln: {result.recipe}: {result.status.replace('_', ' ')}: {result.reason}", err=True)
    ran = sum(1 for r in summary.recipes for s in r.steps if s.status == "ran")
    console.print(f"[dim]{ran} step(s) ran, {summary.seconds:.2f}s[/]")
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2, default=str))
    sys.exit(summary.exit_code)


@main.command()
@click.argument("recipes", nargs=-1, required=True)
@with_common
@click.option("--json", "as_json", is_flag=True)
@_guard
def plan(recipes, artifacts, tracking_uri, as_json) -> None:
    """Show the steps RECIPES would run and which are cached."""
    from pipeline.executor import InlineExecutor
    from pipeline.runner import Runner

    settings = Settings.from_env(artifacts, tracking_uri)
    plans = _plans(recipes, settings)
    status = Runner(settings, InlineExecutor()).status(plans)
    if as_json:
        click.echo(json.dumps({sid: {"stage": o.stage, "key": o.key, "status": o.status} for sid, o in status.items()},
                              indent=2))
        return
    for p in plans:
        click.echo(f"{p.name}: {p.source.uri} -> v{p.source.version} -> {p.bundle_dest}")
        for step in p.steps:
            o = status[step.id]
            after = ", ".join(step.inputs.values())
            state = "cached" if o.status == "cached" else "will run"
            click.echo(f"  {step.stage:<9} {state:<9} {(o.key or '?')[:12]:<12}  {('<- ' + after) if after else ''}")


@main.command()
@click.argument("recipes", nargs=-1, required=True)
@_guard
def validate(recipes) -> None:
    """Check RECIPES against the schema; print every problem with its field path."""
    from pipeline.recipe import recipe_problems

    bad = 0
    for path in _recipe_files(recipes):
        _, problems = recipe_problems(path)
        for problem in problems:
            click.echo(f"{path}: {problem}", err=True)
        bad += bool(problems)
        if not problems:
            click.echo(f"{path}: ok")
    if bad:
        raise BadInput(f"{bad} recipe(s) have problems")


@main.command()
def schema() -> None:
    """Print the recipe JSON Schema."""
    from pipeline.recipe import Recipe

    click.echo(json.dumps(Recipe.model_json_schema(), indent=2))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--html", "as_html", is_flag=True, help="Print the path of report.html instead of report.md")
@click.option("--open", "open_it", is_flag=True, help="Open report.html in the default browser")
@_guard
def report(bundle: Path, as_html: bool, open_it: bool) -> None:
    """Print (or open) the report of a published BUNDLE."""
    md, page = bundle / "report.md", bundle / "report.html"
    if not md.is_file():
        raise BadInput(f"{bundle}: no report.md here; is this a kiln bundle (artifacts/bundles/<recipe>/v<N>)?")
    if open_it:
        import webbrowser

        webbrowser.open(page.resolve().as_uri())
    if as_html or open_it:
        click.echo(str(page.resolve()))
    else:
        click.echo(md.read_text())


@main.command("verify-store")
@with_common
@_guard
def verify_store(artifacts, tracking_uri) -> None:
    """Re-hash every store entry and report any that do not match their record."""
    from pipeline.store import Store

    store = Store(Settings.from_env(artifacts).store_root)
    problems = store.verify()
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise KilnError(f"{len(problems)} problem(s) in {store.root}")
    click.echo(f"{store.root}: ok")
