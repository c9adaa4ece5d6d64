"""Progress from inside a step, for the console of `kiln run`:

    from pipeline import progress
    progress.update("timing batch 32: onnxruntime (run 40)")

A stage may call `update` as often as it likes, from any executor: it costs a clock read when nobody listens
(no listener is set) or when the last line went out less than MIN_INTERVAL_S ago, and it never raises.

Transport: the worker that runs a step (pipeline/executor.py `execute`) writes the step's latest line to a small
file, `progress_file(logs, key)` under the run's logs folder; the runner reads the files of its running steps
about once a second while it waits for them and reports each as a "progress" event. A file needs no pool
initializer, no extra process and no socket, works the same for a local worker process and for a Ray worker on
this machine, and on a node that does not share the logs folder the first write fails and progress is simply off.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

MIN_INTERVAL_S = 0.5  # at most two lines a second reach the listener; the runner reads once a second anyway

_listener: Callable[[str], None] | None = None
_last_sent = float("-inf")
_lock = threading.Lock()  # a stage may report from several threads; only one line goes out at a time


def update(text: str) -> None:
    """Say what the running step is doing now (one short line). Dropped when it comes too soon after the last."""
    global _last_sent
    listener = _listener
    if listener is None:
        return
    now = time.monotonic()
    if now - _last_sent < MIN_INTERVAL_S or not _lock.acquire(blocking=False):
        return
    try:
        _last_sent = now
        listener(" ".join(str(text).split())[:200])  # one line, whatever the caller passed
    except Exception:  # noqa: BLE001 - progress must never fail the step it describes
        pass
    finally:
        _lock.release()


@contextmanager
def listening(listener: Callable[[str], None]) -> Iterator[None]:
    """Send `update`'s lines to listener while the block runs (one step); nothing is sent after it."""
    global _listener, _last_sent
    _listener, _last_sent = listener, float("-inf")
    try:
        yield
    finally:
        _listener = None


def folder(logs: str | Path) -> Path:
    """Where running steps keep their progress files; the runner creates it, a worker never does."""
    return Path(logs) / "progress"


def progress_file(logs: str | Path, key: str) -> Path:
    """Where a step's latest progress line is kept while it runs."""
    return folder(logs) / f"{key[:16]}.txt"


@contextmanager
def to_file(path: Path) -> Iterator[None]:
    """While the block runs, keep the latest line in path (replaced whole, so a reader never sees half a line);
    removed at the end. A folder that is not there (a worker on another node) turns progress off for the step."""

    def write(text: str) -> None:
        global _listener
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError:
            _listener = None  # nobody can read it here: stop trying for this step

    with listening(write):
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def read(path: Path) -> str | None:
    """The latest line in a progress file, or None when there is none yet."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
