"""Run planned recipes: compute each step's key when its inputs are known, reuse cached entries, send the
rest to the executor, stop a recipe at its first failed verdict, deliver bundles.

A step's summary may carry {"verdict": {"passed": bool, "reason": str}}; a failed verdict stops the recipe's
dependent steps and makes the recipe's outcome `gate_failed`. A step with `deliver_to` (the bundle) has its
output delivered there once built. The runner knows nothing else about stages.

Events (on_event(kind, outcome)): start, done, failed, evicted, and progress: about once a second while a step
runs, its latest pipeline.progress line in outcome.progress (read from the file its worker keeps).
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.deliver import BundleTaken, deliver
from pipeline.errors import BadInput, GateFailed, KilnError, StageCrashed
from pipeline.executor import Executor, Task, step_log
from pipeline.plan import RecipePlan, Step, plan_recipe, step_key, step_tools
from pipeline.settings import Settings
from pipeline import open_store, progress
from pipeline.store import Entry


@dataclass
class StepOutcome:
    step: str
    stage: str
    key: str | None = None
    status: str = "pending"  # cached | ran | failed | skipped | pending
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    evicted: str | None = None  # its cached entry's file that failed verification (the entry was rebuilt)
    progress: str | None = None  # while it runs: the latest line its stage sent (pipeline/progress.py)


@dataclass
class RecipeOutcome:
    recipe: str
    path: str
    source: str
    version: str
    status: str = "passed"  # passed | gate_failed | bad_input | crashed | unschedulable
    reason: str | None = None
    bundle: str | None = None
    delivered: bool = False  # published by this run (False: the bundle was there already)
    delivery: str | None = None  # published | identical | kept (another build of this recipe is there: immutable)
    report: str | None = None  # a recipe that did not pass: its report (report.md) under <artifacts>/failed/
    steps: list[StepOutcome] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"passed": 0, "gate_failed": GateFailed.exit_code, "bad_input": BadInput.exit_code}.get(
            self.status, StageCrashed.exit_code
        )


@dataclass
class RunSummary:
    recipes: list[RecipeOutcome]
    seconds: float

    @property
    def exit_code(self) -> int:
        codes = [r.exit_code for r in self.recipes]
        # Worst first: a crash hides nothing, bad input next, then failed gates.
        for code in (3, 2, 1):
            if code in codes:
                return code
        return 0

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"exit_code": self.exit_code, "seconds": round(self.seconds, 3), **asdict(self)}


def lineage(entry: Entry) -> dict[str, Any]:
    """What a downstream step may know about an input's making (publish writes it into the manifest)."""
    meta = entry.meta
    return {k: meta.get(k) for k in ("stage", "key", "config", "tools", "seconds", "summary", "output_hash")}


Event = Callable[[str, StepOutcome], None]
PROGRESS_POLL_S = 1.0  # how often the runner, waiting for its steps, reads their progress files


class Runner:
    def __init__(self, settings: Settings, executor: Executor, on_event: Event | None = None):
        self.settings = settings
        self.store = open_store(settings.store_root, settings.store_url)
        self.executor = executor
        self.on_event = on_event or (lambda kind, outcome: None)

    def _task(self, step: Step, key: str, inputs: dict[str, Entry], missing: dict[str, str]) -> Task:
        return Task(
            step_id=step.id,
            stage=step.stage,
            key=key,
            config=step.config.model_dump(mode="json"),
            inputs={name: str(entry.out) for name, entry in inputs.items()},
            input_hashes={name: entry.output_hash for name, entry in inputs.items()},
            context={**step.context, "upstream": {name: lineage(e) for name, e in inputs.items()},
                     **({"missing": missing} if missing else {})},
            tools=step_tools(step, inputs),
            store_root=str(self.store.root),
            logs=str(self.settings.logs),
            resources=step.resources,
            input_keys={name: entry.key for name, entry in inputs.items()},
            store_url=self.settings.store_url,
        )

    def status(self, plans: list[RecipePlan]) -> dict[str, StepOutcome]:
        """What `run` would do, without running: each step is cached, or will run."""
        outcomes: dict[str, StepOutcome] = {}
        entries: dict[str, Entry] = {}
        for plan in plans:
            for step in plan.steps:
                outcome = StepOutcome(step.id, step.stage)
                if all(i in entries for i in [*step.inputs.values(), *step.after]):
                    outcome.key = step_key(step, {n: entries[i] for n, i in step.inputs.items()})
                    entry = self.store.lookup(outcome.key)
                    if entry is not None:
                        entries[step.id] = entry
                        outcome.status = "cached"
                        outcome.summary = entry.meta.get("summary", {})
                outcomes[step.id] = outcome
        return outcomes

    def run(self, plans: list[RecipePlan]) -> RunSummary:
        started = time.perf_counter()
        self.store.clean_stale()
        progress.folder(self.settings.logs).mkdir(parents=True, exist_ok=True)
        state = _Run(self, plans)
        try:
            while state.pending or state.running:
                if state.schedule():
                    continue
                if not state.running:
                    break
                state.collect()
        finally:
            self.executor.shutdown()
        return RunSummary(list(state.results.values()), time.perf_counter() - started)


class _Run:
    """One run's bookkeeping: which steps wait, run, finished or failed, and each recipe's outcome."""

    def __init__(self, runner: Runner, plans: list[RecipePlan]):
        self.runner = runner
        self.plans = {p.name: p for p in plans}
        self.results = {p.name: RecipeOutcome(p.name, str(p.path), p.source.uri, p.source.version) for p in plans}
        self.steps = {s.id: s for p in plans for s in p.steps}
        self.outcomes = {sid: StepOutcome(sid, s.stage) for sid, s in self.steps.items()}
        for plan in plans:
            self.results[plan.name].steps = [self.outcomes[s.id] for s in plan.steps]
        self.entries: dict[str, Entry] = {}
        self.running: dict[Future, list[str]] = {}  # one future per key; steps of several recipes may share it
        self.by_key: dict[str, Future] = {}
        self.failed_keys: dict[str, KilnError] = {}  # a key whose build failed: a later step of that key fails alike
        self.pending = [s.id for p in plans for s in p.steps]
        self.lacking: dict[str, str] = {}  # optional step that failed -> why

    def stop(self, recipe: str, status: str, reason: str) -> None:
        result = self.results[recipe]
        if result.status == "passed":
            result.status, result.reason = status, reason
        for sid in list(self.pending):
            if self.steps[sid].recipe == recipe:
                self.pending.remove(sid)
                self.outcomes[sid].status = "skipped"

    def finished(self, sid: str, entry: Entry, cached: bool) -> None:
        outcome = self.outcomes[sid]
        self.entries[sid] = entry
        outcome.status, outcome.progress = ("cached" if cached else "ran"), None
        outcome.summary = entry.meta.get("summary", {})
        outcome.seconds = 0.0 if cached else float(entry.meta.get("seconds", 0.0))
        self.runner.on_event("done", outcome)
        step = self.steps[sid]
        verdict = outcome.summary.get("verdict")
        if verdict is not None and not verdict.get("passed", False):
            self.stop(step.recipe, "gate_failed", verdict.get("reason", f"{sid} failed"))
        elif step.deliver_to is not None:
            self.deliver(step, entry)

    def deliver(self, step: Step, entry: Entry) -> None:
        result = self.results[step.recipe]
        try:
            result.delivery = deliver(entry.out, step.deliver_to)
        except BundleTaken as taken:
            self.replan(step.recipe, taken)
            return
        except KilnError as exc:  # the bundle failed its last check against its manifest
            self.stop(step.recipe, "crashed", str(exc))
            return
        result.bundle, result.delivered = str(step.deliver_to), result.delivery == "published"

    def replan(self, recipe: str, taken: BundleTaken) -> None:
        """Another recipe's build published this version's folder while this one ran (both planned before either
        published). Bundles are immutable: plan again, for a folder of its own; what is built is found cached
        and only what holds the bundle's path (serving configs, the bundle) is built again."""
        old = self.plans[recipe]
        plan = self.plans[recipe] = plan_recipe(old.recipe, old.path, old.source, self.runner.settings)
        if plan.bundle_dest == old.bundle_dest:  # its own folder holds something else: nowhere left to go
            self.stop(recipe, "crashed", str(taken))
            return
        self.pending = [sid for sid in self.pending if self.steps[sid].recipe != recipe]
        for step in plan.steps:
            self.steps[step.id], self.outcomes[step.id] = step, StepOutcome(step.id, step.stage)
            self.entries.pop(step.id, None)
            self.pending.append(step.id)
        self.results[recipe].steps = [self.outcomes[s.id] for s in plan.steps]

    def failed(self, sid: str, error: str) -> None:
        self.outcomes[sid].status, self.outcomes[sid].progress = "failed", None
        self.outcomes[sid].summary = {"error": error}
        self.runner.on_event("failed", self.outcomes[sid])

    def schedule(self) -> bool:
        """Start (or find cached) every step whose inputs are ready, up to the executor's capacity."""
        progressed = False
        for sid in list(self.pending):
            if sid not in self.pending:  # a failed verdict just stopped its recipe
                continue
            step = self.steps[sid]
            if not all(i in self.entries or i in self.lacking for i in [*step.inputs.values(), *step.after]):
                continue
            missing = {name: f"{i}: {self.lacking[i]}" for name, i in step.inputs.items() if i in self.lacking}
            if missing and step.optional:  # a candidate built from a failed candidate fails with it
                self.pending.remove(sid)
                progressed = True
                self.lacking[sid] = next(iter(missing.values()))
                self.failed(sid, f"needs {self.lacking[sid]}")
                continue
            if len(self.running) >= self.runner.executor.capacity:
                break
            self.pending.remove(sid)
            progressed = True
            self.start(step, missing)
        return progressed

    def start(self, step: Step, missing: dict[str, str]) -> None:
        inputs = {name: self.entries[i] for name, i in step.inputs.items() if i in self.entries}
        key = step_key(step, inputs)
        self.outcomes[step.id].key = key
        entry = self.runner.store.lookup(key)
        damaged = self.runner.store.evicted.pop(key, None)
        if damaged is not None:  # verified before use: a tampered or rotted entry is never reused
            self.outcomes[step.id].evicted = damaged
            self.runner.on_event("evicted", self.outcomes[step.id])
        if entry is not None:
            self.finished(step.id, entry, cached=True)
        elif key in self.failed_keys:  # another recipe's step of this key already failed: do not build it again
            self.fail(step.id, self.failed_keys[key])
        elif key in self.by_key:
            self.running[self.by_key[key]].append(step.id)
        else:
            self.runner.on_event("start", self.outcomes[step.id])
            # a line left by a killed run of this key must not show as this run's
            progress.progress_file(self.runner.settings.logs, key).unlink(missing_ok=True)
            future = self.runner.executor.submit(self.runner._task(step, key, inputs, missing))
            self.by_key[key] = future
            self.running[future] = [step.id]

    def collect(self) -> None:
        """Wait for a running step; record what it built or why it failed. While waiting, report progress."""
        done: set[Future] = set()
        while not done:
            done, _ = wait(list(self.running), timeout=PROGRESS_POLL_S, return_when=FIRST_COMPLETED)
            if not done:
                self.report_progress()
        for future in done:
            sids = self.running.pop(future)
            try:
                meta = future.result()
            except BrokenProcessPool:
                outcome = self.outcomes[sids[0]]
                log = step_log(self.runner.settings.logs, outcome.stage, outcome.key or "")
                error: KilnError = StageCrashed(
                    f"{sids[0]}: the worker process died (out of memory or a crash in a native library)"
                    + (f"; its output: {log}" if log.is_file() else "")
                )
            except KilnError as exc:
                error = exc
            else:
                entry = self.runner.store.lookup(meta["key"])
                assert entry is not None, f"committed entry {meta['key']} vanished"
                for sid in sids:
                    self.finished(sid, entry, cached=False)
                continue
            self.failed_keys[self.outcomes[sids[0]].key] = error
            for sid in sids:
                self.fail(sid, error)

    def report_progress(self) -> None:
        """A "progress" event for each running step whose stage said what it is doing."""
        for sids in self.running.values():
            outcome = self.outcomes[sids[0]]
            text = progress.read(progress.progress_file(self.runner.settings.logs, outcome.key or ""))
            if text:
                for sid in sids:
                    self.outcomes[sid].progress = text
                    self.runner.on_event("progress", self.outcomes[sid])

    def fail(self, sid: str, error: KilnError) -> None:
        """A step failed with error: an optional step leaves its reason for what reads it, any other stops its recipe."""
        self.failed(sid, str(error))
        if self.steps[sid].optional:
            self.lacking[sid] = str(error)
            return
        status = "bad_input" if isinstance(error, BadInput) else getattr(error, "status", "crashed")
        self.stop(self.steps[sid].recipe, status, str(error))


def bundle_paths(outcome: RecipeOutcome) -> dict[str, Path]:
    if not outcome.bundle:
        return {}
    root = Path(outcome.bundle)
    return {"bundle": root, "report": root / "report.md", "manifest": root / "manifest.json"}
