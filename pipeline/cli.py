"""The `kiln` command line. Exit codes: 0 passed, 1 a gate failed, 2 bad input (recipe, URI, model), 3 other."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import click

from pipeline.errors import BadInput, KilnError, first_line
from pipeline.settings import Settings, quiet_environment, quiet_python_output, verbose as verbose_set


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _recipe_files(paths):
    from pipeline.build import recipe_files

    return recipe_files(paths)


def _plans(paths, settings: Settings):
    from pipeline.build import plan_all

    return plan_all(paths, settings)


def _guard(func):
    """Turn kiln's typed errors into one line on stderr and their exit code."""

    def wrapper(*args, **kwargs):
        quiet_environment()
        try:
            return func(*args, **kwargs)
        except KilnError as exc:
            click.echo(f"kiln: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except BrokenPipeError as exc:
            if _stdout_gone():
                _quiet_broken_pipe()
            _crashed(exc, kwargs.get("artifacts"))
        except Exception as exc:  # noqa: BLE001 - last resort: still one line, still a code
            _crashed(exc, kwargs.get("artifacts"))

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


def _crashed(exc: BaseException, artifacts: str | None) -> None:
    """Something kiln did not expect: one line naming it and where its traceback is, exit 3."""
    # The log goes where this command keeps its artifacts (--artifacts / KILN_ARTIFACTS), not ./artifacts.
    log = _crash_log(artifacts, traceback.format_exc())
    click.echo(f"kiln: internal error: {type(exc).__name__}: {first_line(exc)} (traceback: {log})", err=True)
    sys.exit(3)


def _stdout_gone() -> bool:
    """stdout is a pipe whose reader has closed it: the broken pipe is the reader's doing, not a crash (a worker's
    or a socket's broken pipe is still a crash)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file descriptor behind stdout
        return False


def _crash_log(artifacts: str | None, text: str) -> Path:
    """Write a crash's traceback where this command keeps its artifacts (--artifacts / KILN_ARTIFACTS, not
    ./artifacts), or in the temp folder when that cannot be written (the crash may be about that very folder)."""
    import os
    import tempfile

    try:
        log = Path(Settings.from_env(artifacts).logs) / "kiln-crash.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
    except (OSError, KilnError):
        log = Path(tempfile.gettempdir()) / f"kiln-crash-{os.getpid()}.log"
        log.write_text(text)
    return log


def _quiet_broken_pipe() -> None:
    """The reader went away (`kiln plan ... | head -1`): stop quietly, as `cat` would (128 + SIGPIPE). stdout is
    pointed at /dev/null first, or Python's own flush at exit would report the broken pipe once more."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor behind stdout (an in-process runner)
        pass
    sys.exit(141)


artifacts_option = click.option("--artifacts", envvar="KILN_ARTIFACTS",
                                help="Store, bundles and default registry [artifacts/]")
common = [
    artifacts_option,
    click.option("--tracking-uri", help="MLflow tracking URI; overrides the recipe and MLFLOW_TRACKING_URI"),
]


def with_common(func):
    for option in reversed(common):
        func = option(func)
    return func


executor_options = [
    click.option("--jobs", default=1, show_default=True, help="Steps run at once (latency is measured best with 1)"),
    click.option("--executor", default="local", show_default=True,
                 help="local (worker processes), inline, or ray[=ADDRESS] (Ray tasks; see README, Running on Ray)"),
    click.option("--store-url", envvar="KILN_STORE_URL",
                 help="fsspec URL of a shared step store, for workers that share no disk (file://, s3://, ...)"),
]


def with_executor(func):
    for option in reversed(executor_options):
        func = option(func)
    return func


verbose_option = click.option(
    "--verbose", "-v", is_flag=True, envvar="KILN_VERBOSE",
    help="Let third-party output (TensorFlow, absl, oneDNN, warnings, MLflow notices) through to the console; "
         "without it, a step's goes to its log in <artifacts>/logs/")


def _verbosity(verbose: bool) -> None:
    """--verbose reaches the worker processes through KILN_VERBOSE (pipeline/executor.py streams their output
    then); without it, this process drops libraries' Python warnings and log records too."""
    if verbose:
        os.environ["KILN_VERBOSE"] = "1"
    if not verbose_set():
        quiet_python_output()


class _StepLines:
    """The console lines of a build's steps. On a terminal, running steps sit on live lines below the finished
    ones, with their elapsed time and latest progress (refreshed once a second: cheap while steps are timed).
    Elsewhere (CI logs, tests): a line when a step starts and when it ends, and in between its progress at
    most every KILN_PROGRESS_INTERVAL seconds (15) per step, so a log is not flooded."""

    def __init__(self, console):
        self.console = console
        self.every = float(os.environ.get("KILN_PROGRESS_INTERVAL") or 15)
        self.started: dict[str, float] = {}
        self.latest: dict[str, str] = {}
        self.shown: dict[str, float] = {}  # when each step's last progress line was printed (not on a terminal)
        self.live = None

    def __enter__(self) -> "_StepLines":
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self, console=self.console, refresh_per_second=1, transient=True)
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def __rich__(self):
        from rich.text import Text

        now = time.monotonic()
        return Text("\n".join(f"  … {step:<32} {now - at:5.0f}s  {self.latest.get(step, 'running')}"
                               for step, at in self.started.items()), style="dim")

    def __call__(self, kind: str, outcome) -> None:
        from rich.markup import escape

        step, now = outcome.step, time.monotonic()
        if kind == "start":
            self.started[step] = self.shown[step] = now
            if self.live is None:
                self.console.print(f"  [dim]…[/] {step:<32} running")
        elif kind == "progress":
            self.latest[step] = outcome.progress
            started = self.started.setdefault(step, now)  # a step sharing another's key has no start of its own
            if self.live is None and now - self.shown.setdefault(step, now) >= self.every:
                self.shown[step] = now
                self.console.print(f"  [dim]… {step:<32} {now - started:5.0f}s  {escape(outcome.progress)}[/]")
        elif kind in ("done", "failed"):
            for running in (self.started, self.latest, self.shown):
                running.pop(step, None)
            if kind == "done":
                mark = "[green]✓[/]" if outcome.status == "ran" else "[dim]=[/]"
                what = f"{outcome.seconds:6.2f}s" if outcome.status == "ran" else " cached"
                self.console.print(f"  {mark} {step:<32} {what}  [dim]{outcome.key[:12]}[/]")
            else:
                why = outcome.summary.get("error")
                self.console.print(f"  [red]✗[/] {step:<32} failed" + (f" [dim]({escape(why)})[/]" if why else ""))


def _settings(artifacts, tracking_uri, executor="local", jobs=1, store_url=None) -> Settings:
    settings = Settings.from_env(artifacts, tracking_uri)
    return replace(settings, executor=executor, jobs=jobs, store_url=store_url or settings.store_url)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="modelkiln", prog_name="kiln")
def main() -> None:
    """kiln: MLflow registry -> validated, optimized ONNX bundles."""


@main.command()
@click.argument("recipes", nargs=-1, required=True)
@with_common
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout")
@with_executor
@verbose_option
@_guard
def run(recipes, artifacts, tracking_uri, as_json, jobs, executor, store_url, verbose) -> None:
    """Build RECIPES (files or folders): fetch, export, optimize, validate, gate, publish."""
    from pipeline.build import build

    _verbosity(verbose)
    settings = _settings(artifacts, tracking_uri, executor, jobs, store_url)
    plans = _plans(recipes, settings)
    console = _console()

    # stdout carries only the --json summary: what libraries print meanwhile (Ray's notices) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr), _StepLines(console) as on_event:
        summary = build(plans, settings, on_event=on_event, warn=lambda m: click.echo(m, err=True))
    _print_outcomes(console, summary)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2, default=str))
    sys.exit(summary.exit_code)


def _print_outcomes(console, summary) -> None:
    for result in summary.recipes:
        if result.status == "passed":
            state = {"published": "published", "kept": "up to date (an earlier build of this recipe, kept: bundles "
                     "are immutable)"}.get(result.delivery, "up to date")
            console.print(f"[green]{result.recipe}[/]: passed, {state}: {result.bundle}/  (report.md, manifest.json)")
        else:
            where = f" (report: {result.report})" if result.report else ""  # still one line: the report says more
            click.echo(f"kiln: {result.recipe}: {result.status.replace('_', ' ')}: {result.reason}{where}", err=True)
    ran = sum(1 for r in summary.recipes for s in r.steps if s.status == "ran")
    console.print(f"[dim]{ran} step(s) ran, {summary.seconds:.2f}s[/]")


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
@click.argument("recipes", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output")
@_guard
def targets(recipes, as_json) -> None:
    """List the hardware targets this machine can tune for: the built-in profiles and those RECIPES define."""
    from pipeline import registry
    from pipeline.hardware import BUILTIN
    from pipeline.recipe import load_recipe

    profiles = dict(BUILTIN)
    for path in _recipe_files(recipes) if recipes else []:
        tune = load_recipe(path).tune
        profiles.update(tune.profiles if tune else {})
    here = registry.describe_machine()
    rows = [{"target": name, "provider": p.provider,
             "available": registry.unavailable_reason(p.provider, here) is None,
             "reason": registry.unavailable_reason(p.provider, here), "precisions": p.precisions,
             "description": p.description} for name, p in profiles.items()]
    if as_json:
        click.echo(json.dumps({"machine": here, "targets": rows}, indent=2))
        return
    click.echo(f"machine: {here['cpu']}, {here['cores']} cores, ISA {', '.join(here['isa']) or '-'}, "
               f"GPUs {', '.join(here['gpus']) or 'none'}, onnxruntime {here['onnxruntime']}")
    for row in rows:
        state = "yes" if row["available"] else f"no: {row['reason']}"
        click.echo(f"  {row['target']:<9} {row['provider']:<27} {'/'.join(row['precisions']):<32} {state}")


@main.command()
@_guard
def schema() -> None:
    """Print the recipe JSON Schema."""
    from pipeline.recipe import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@click.argument("bundle", metavar="BUNDLE|RECIPE")
@click.option("--last", is_flag=True,
              help="BUNDLE is a recipe (name or file): show its newest report, of a published bundle or a failed build")
@click.option("--html", "as_html", is_flag=True, help="Print the path of report.html instead of report.md")
@click.option("--open", "open_it", is_flag=True, help="Open report.html in the default browser")
@artifacts_option
@_guard
def report(bundle: str, last: bool, as_html: bool, open_it: bool, artifacts: str | None) -> None:
    """Print (or open) the report of a published BUNDLE (or a failed build's folder under artifacts/failed/);
    with --last, the newest report of the recipe BUNDLE names."""
    from pipeline.reports import newest_report

    folder = newest_report(bundle, Settings.from_env(artifacts)).parent if last else Path(bundle)
    md, page = folder / "report.md", folder / "report.html"
    if not md.is_file():
        raise BadInput(f"{bundle}: no report.md here; is this a kiln bundle (artifacts/bundles/<recipe>/v<N>)? "
                       "For a recipe's newest report: kiln report RECIPE --last")
    if open_it:
        import webbrowser

        webbrowser.open(page.resolve().as_uri())
    if as_html or open_it:
        click.echo(str(page.resolve()))
    else:
        click.echo(md.read_text())


@main.command()
@click.argument("recipes", nargs=-1, required=True)
@with_common
@click.option("--model", help="Only recipes whose source is this registered model (e.g. from a webhook)")
@click.option("--version", "model_version", help="With --model: only recipes that resolve to this version")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML here")
@click.option("--summary", "summary_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)")
@with_executor
@verbose_option
@_guard
def ci(recipes, artifacts, tracking_uri, model, model_version, junit, summary_path, jobs, executor, store_url,
       verbose) -> None:
    """CI mode: build the recipes a model version affects (or all); JUnit XML and Markdown; non-zero on failure."""
    from pipeline.build import build, plan_all
    from pipeline.ci import junit_xml, markdown

    _verbosity(verbose)
    settings = _settings(artifacts, tracking_uri, executor, jobs, store_url)
    plans = plan_all(recipes, settings, model=model, version=model_version)
    if not plans:
        click.echo(f"kiln ci: no recipe follows {model or 'anything'}{' v' + model_version if model_version else ''}")
    console = _console()
    with _StepLines(console) as on_event:
        summary = build(plans, settings, on_event=on_event, warn=lambda m: click.echo(m, err=True))
    _print_outcomes(console, summary)
    for path, text in ((junit, junit_xml(summary) if junit else None), (summary_path, markdown(summary))):
        if path and text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
    sys.exit(summary.exit_code)


@main.command()
@click.argument("recipes", nargs=-1, required=True)
@with_common
@click.option("--interval", default=30.0, show_default=True, help="Seconds between registry polls")
@click.option("--once", is_flag=True, help="Poll once, build what is new, and exit")
@with_executor
@verbose_option
@_guard
def watch(recipes, artifacts, tracking_uri, interval, once, jobs, executor, store_url, verbose) -> None:
    """Poll the registry; build each new version (or alias move) the RECIPES follow, once."""
    from pipeline.watch import watch as run_watch

    _verbosity(verbose)
    settings = _settings(artifacts, tracking_uri, executor, jobs, store_url)
    run_watch(recipes, settings, interval, once, say=lambda m: click.echo(m, err=True))


@main.command("webhook-server")
@click.argument("recipes", nargs=-1, required=True)
@with_common
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True)
@click.option("--secret-env", default="KILN_WEBHOOK_SECRET", show_default=True,
              help="Environment variable holding the webhook secret (never on the command line)")
@_guard
def webhook_server(recipes, artifacts, tracking_uri, host, port, secret_env) -> None:
    """Receive MLflow registry webhooks (HMAC-verified, replay-protected) and build what they affect."""
    import asyncio
    import os
    import queue
    import threading

    from pipeline.recipe import load_recipe, parse_model_uri
    from pipeline.watch import poll_once
    from pipeline.webhook import Receiver, Verifier

    secret = os.environ.get(secret_env)
    if not secret:
        raise BadInput(f"--secret-env {secret_env}: the environment variable is empty; set the webhook's secret there")
    settings = Settings.from_env(artifacts, tracking_uri)
    files = _recipe_files(recipes)
    followed = {parse_model_uri(load_recipe(path).source.uri)[0] for path in files}
    jobs: queue.Queue = queue.Queue()
    say = lambda m: click.echo(m, err=True)  # noqa: E731
    verifier = Verifier(secret, replays=settings.artifacts / "webhook" / "deliveries.json")
    receiver = Receiver(verifier, lambda name: name in followed, jobs, say)

    def worker():
        while True:
            job = jobs.get()
            try:
                if not poll_once(recipes, settings, say, model=job["model"]):
                    say(f"kiln webhook: {job['model']}: nothing new built")
            except Exception as exc:  # noqa: BLE001 - keep serving; the next event or `watch` retries
                say(f"kiln webhook: build for {job['model']} failed to start: {exc}")

    def ready(bound: int) -> None:
        threading.Thread(target=worker, daemon=True).start()
        say(f"kiln webhook: listening on http://{host}:{bound}/ for {', '.join(sorted(followed))}")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(receiver.serve(host, port, ready))


@main.command("verify-store")
@with_common
@_guard
def verify_store(artifacts, tracking_uri) -> None:
    """Re-hash every store entry and report any that do not match their record."""
    from pipeline import open_store

    settings = Settings.from_env(artifacts)
    store = open_store(settings.store_root, settings.store_url)  # with KILN_STORE_URL, the shared store too
    problems = store.verify()
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise KilnError(f"{len(problems)} problem(s) in {store.root}")
    click.echo(f"{store.root}: ok")
