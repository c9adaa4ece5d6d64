"""Executors run one step each. The runner talks only to this interface, so a distributed executor can be
added without touching any stage: it must run `execute(task)` somewhere that sees the store and return its
result (or raise its error).

`execute` is the whole life of a step on a worker: build into a private folder, commit atomically.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import KilnError, StageCrashed
from pipeline.settings import quiet_environment
from pipeline.store import Store


@dataclass(frozen=True)
class Task:
    step_id: str
    stage: str
    key: str
    config: dict[str, Any]
    inputs: dict[str, str]  # input name -> the upstream entry's out folder
    input_hashes: dict[str, str]
    context: dict[str, Any]
    tools: dict[str, str | None]
    store_root: str
    logs: str


def execute(task: Task) -> dict[str, Any]:
    """Run a step and commit its outputs; returns the committed entry's meta."""
    quiet_environment()
    from stages import load_stage

    store = Store(Path(task.store_root))
    existing = store.lookup(task.key)
    if existing is not None:  # another worker finished the same key first
        return existing.meta
    folder = store.begin(task.key)
    started = time.perf_counter()
    try:
        stage = load_stage(task.stage)
        summary = stage.run(task.config, {n: Path(p) for n, p in task.inputs.items()}, folder / "out", task.context)
    except KilnError:
        store.abandon(folder)
        raise
    except Exception as exc:
        store.abandon(folder)
        log = Path(task.logs) / f"{task.stage}-{task.key[:12]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise StageCrashed(
            f"{task.step_id}: stage crashed with {type(exc).__name__}: {first} (traceback: {log})"
        ) from None
    meta = {
        "stage": task.stage,
        "step": task.step_id,
        "config": task.config,
        "inputs": task.input_hashes,
        "tools": task.tools,
        "summary": summary or {},
        "seconds": round(time.perf_counter() - started, 3),
    }
    return store.commit(task.key, folder, meta).meta


class Executor(Protocol):
    capacity: int  # steps it runs at once; the runner submits no more than that

    def submit(self, task: Task) -> Future: ...

    def shutdown(self) -> None: ...


class InlineExecutor:
    """Runs each step in this process. For debugging and for callers that already isolate runs."""

    capacity = 1

    def submit(self, task: Task) -> Future:
        future: Future = Future()
        try:
            future.set_result(execute(task))
        except BaseException as exc:  # noqa: BLE001 - handed to the runner through the future
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        pass


class LocalProcessExecutor:
    """Runs steps in worker processes on this machine (the default). A stage that crashes the interpreter
    (a segfault in a native library) fails its step, not the run. Workers stay up between steps, so a
    framework is imported once per worker, not once per step."""

    def __init__(self, jobs: int = 1):
        self.jobs = self.capacity = jobs
        self._pool: ProcessPoolExecutor | None = None

    def _ensure(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: forking a process that already loaded torch/onnxruntime threads is unsafe.
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def submit(self, task: Task) -> Future:
        return self._ensure().submit(execute, task)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def make_executor(name: str, jobs: int) -> Executor:
    if name == "local":
        return LocalProcessExecutor(jobs)
    if name == "inline":
        return InlineExecutor()
    from pipeline.errors import BadInput

    raise BadInput(f"--executor {name}: unknown executor (known: local, inline)")
