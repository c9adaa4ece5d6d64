"""Executors run one step each. The runner talks only to this interface, so a distributed executor can be
added without touching any stage: it must run `execute(task)` somewhere that sees the store and return its
result (or raise its error). With a store URL (Task.store_url) a worker needs no shared disk: `execute` pulls
the inputs by key into the local store at `store_root` and pushes the outputs (pipeline/remote_store.py).

`execute` is the whole life of a step on a worker: build into a private folder, commit atomically.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import KilnError, StageCrashed, first_line
from pipeline.settings import quiet_environment, verbose
from pipeline import open_store, progress


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
    resources: dict[str, float] = field(default_factory=dict)  # Step.resources; empty = 1 CPU
    input_keys: dict[str, str] = field(default_factory=dict)  # input name -> the upstream entry's key
    store_url: str | None = None  # the shared store; store_root is then this worker's cache of it


def _inputs(task: Task, store) -> dict[str, Path]:
    """Where the step reads its inputs: the upstream out folders (pulled into this worker's store if need be),
    each verified against its recorded sha256 now, just before use (cheap when untouched: see pipeline/store.py)."""
    found = {}
    for name, key in task.input_keys.items():
        entry = store.lookup(key)
        if entry is None or entry.output_hash != task.input_hashes[name]:
            damaged = store.evicted.get(key)
            where = task.store_url or task.store_root
            why = (f"its {damaged} no longer matches its recorded sha256 (evicted)" if damaged
                   else f"it is not in {where} as the runner saw it (was the store cleaned during the run?)")
            raise StageCrashed(f"{task.step_id}: input {name} (entry {key[:12]}): {why}; run again to rebuild it")
        found[name] = entry.out
    return found


def step_log(logs: str | Path, stage: str, key: str) -> Path:
    """A step's log: what its local worker wrote to stdout/stderr while it ran (unless verbose), and the
    traceback when it crashed."""
    return Path(logs) / f"{stage}-{key[:12]}.log"


def execute(task: Task, worker: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a step and commit its outputs; returns the committed entry's meta (`worker`: where it ran)."""
    quiet_environment()
    from pipeline import registry  # imports the stages only in the worker

    store = open_store(Path(task.store_root), task.store_url)
    existing = store.lookup(task.key)
    if existing is not None:  # another worker finished the same key first
        return existing.meta
    inputs = _inputs(task, store)
    folder = store.begin(task.key)
    started = time.perf_counter()
    try:
        with progress.to_file(progress.progress_file(task.logs, task.key)):
            summary = registry.run(task.stage, task.config, inputs, folder / "out", task.context)
    except KilnError:
        store.abandon(folder)
        raise
    except Exception as exc:
        store.abandon(folder)
        log = step_log(task.logs, task.stage, task.key)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as handle:  # after what the step wrote to stderr, if that went here too
            handle.write(traceback.format_exc())
        first = first_line(exc)
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
        **({"worker": worker} if worker else {}),
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


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _start_worker(parent: int) -> None:
    """Worker initializer. The worker's stdout is its stderr from now on: a library that prints (C++ code
    writing to fd 1) must not land in the runner's stdout, which carries `kiln run --json`'s summary."""
    sys.stdout.flush()
    os.dup2(2, 1)
    _die_with_parent(parent)


@contextlib.contextmanager
def _output_to(log: Path):
    """Point this process's fds 1 and 2 at log while the block runs, and back after. At the descriptor level,
    not sys.stderr: TensorFlow's, absl's and oneDNN's C++ logging writes to fd 2 directly."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # O_APPEND: a crash's traceback, appended by `execute` through a handle of its own, is never overwritten
    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        quiet = os.fstat(target).st_size == 0
        for fd in (target, *saved):
            os.close(fd)
        if quiet:  # most steps say nothing: no empty log for them
            log.unlink(missing_ok=True)


def _local_step(task: Task) -> dict[str, Any]:
    """One step in a local worker process. What it writes to stdout and stderr (third-party chatter:
    TensorFlow, absl, oneDNN, Python warnings) goes to its log, not the console; with --verbose
    (KILN_VERBOSE) it streams to the console as it comes."""
    if verbose():
        return execute(task)
    with _output_to(step_log(task.logs, task.stage, task.key)):
        return execute(task)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: a worker must not outlive the runner that started it (a runner killed with SIGKILL
    cannot shut its pool down; its workers would finish their step and then wait forever, holding their memory).
    Linux: the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG). Everywhere, and for the moment
    before prctl took effect: a thread that exits when the parent is gone (re-parented: getppid changes)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers it
    if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
        os._exit(1)

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watchdog, name="kiln-parent-watchdog", daemon=True).start()


class LocalProcessExecutor:
    """Runs steps in worker processes on this machine (the default). A stage that crashes the interpreter
    (a segfault in a native library) fails its step, not the run. Workers stay up between steps, so a
    framework is imported once per worker, not once per step. Workers die with the runner, even one killed
    with SIGKILL (`_die_with_parent`; PR_SET_PDEATHSIG fires when the *thread* that spawned the worker ends:
    the pool spawns in the thread that submits, the runner's, which outlives the pool); `shutdown` joins them."""

    def __init__(self, jobs: int = 1):
        self.jobs = self.capacity = jobs
        self._pool: ProcessPoolExecutor | None = None

    def _ensure(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: forking a process that already loaded torch/onnxruntime threads is unsafe.
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(os.getpid(),))
        return self._pool

    def submit(self, task: Task) -> Future:
        return self._ensure().submit(_local_step, task)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
