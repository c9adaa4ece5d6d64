"""`kiln watch`: poll the registry for what the recipes follow (a new version behind models:/NAME/latest, an
alias that moved) and build each resolved version once.

Restart-safe: what was handled is kept in <artifacts>/watch/state.json (written atomically), and the step
cache makes a repeated build cheap anyway. A lock file per model version keeps two watchers (or a watcher and
the webhook receiver) from building the same version at once. Registry errors back off exponentially.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from pipeline.errors import BadInput, KilnError, SourceError
from pipeline.mlflow_registry import Unreachable
from pipeline.settings import Settings
from pipeline.store import _pid_alive, write_json_atomic


class State:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.handled: dict[str, dict] = json.loads(path.read_text())["handled"]
        except (OSError, ValueError, KeyError):
            self.handled = {}

    def done(self, key: str, result: dict) -> None:
        self.handled[key] = result
        write_json_atomic(self.path, {"handled": self.handled})


@contextmanager
def version_lock(folder: Path, name: str):
    """Yields True when this process holds the lock for `name`, False when a live process does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.lock"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(path.read_text() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and _pid_alive(owner):
                yield False
                return
            path.unlink(missing_ok=True)  # left by a process that died
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


def poll_once(paths, settings: Settings, say: Callable[[str], None] = print, model: str | None = None) -> list[dict]:
    """Build every (recipe, resolved version) not handled yet; returns what was built this time."""
    from pipeline.build import build, plan_all, recipe_files

    folder = settings.artifacts / "watch"
    state = State(folder / "state.json")
    built = []
    plans = []
    down: list[Unreachable] = []
    for path in recipe_files(paths):
        try:
            plans += plan_all([path], settings, model=model)
        except Unreachable as exc:
            down.append(exc)  # that registry is down: the others still build; then back off and poll again
            say(f"kiln watch: {path}: {exc}")
        except BadInput as exc:  # e.g. an alias not set yet, a model with no versions: this recipe only
            say(f"kiln watch: {path}: {exc}")
    for plan in plans:
        key = f"{plan.name}|{plan.source.name}|{plan.source.version}"
        if key in state.handled:
            continue
        with version_lock(folder / "locks", f"{plan.source.name}-v{plan.source.version}-{plan.name}") as mine:
            if not mine:
                say(f"kiln watch: {key} is being built by another process")
                continue
            say(f"kiln watch: building {plan.name} for {plan.source.uri} -> version {plan.source.version}")
            summary = build([plan], settings, warn=say)
            outcome = summary.recipes[0]
            if outcome.status == "crashed" or (outcome.status == "bad_input" and "unreachable" in (outcome.reason or "")):
                say(f"kiln watch: {key}: {outcome.reason}; will retry")
                continue
            result = {"status": outcome.status, "reason": outcome.reason, "bundle": outcome.bundle, "at": time.time()}
            state.done(key, result)
            built.append({"key": key, **result})
            say(f"kiln watch: {key}: {outcome.status}")
    if down:
        raise down[0]
    return built


def watch(paths, settings: Settings, interval: float, once: bool, max_backoff: float = 300.0,
          say: Callable[[str], None] = print, iterations: int | None = None) -> None:
    backoff = interval
    count = 0
    while True:
        count += 1
        try:
            poll_once(paths, settings, say)
            backoff = interval
        except SourceError as exc:
            if once:
                raise
            backoff = min(max_backoff, max(interval, backoff * 2))
            say(f"kiln watch: registry error: {exc}; retrying in {backoff:.0f}s")
        except KilnError:
            raise
        if once or (iterations is not None and count >= iterations):
            return
        time.sleep(backoff)
