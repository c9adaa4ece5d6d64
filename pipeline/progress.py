"""Progress from inside a step, for the console of `kiln run`:

    from pipeline import progress
    progress.update("timing batch 32: onnxruntime (run 40)")

A stage may call `update` as often as it likes, from any thread and under any executor: it only stores the
line (nothing at all happens when nobody listens), and never raises. While a step runs, a sender thread passes
the latest line on at most every SEND_INTERVAL_S, and only when it changed: a timing loop that reports every
iteration costs an assignment per iteration, and a phase that follows another within the interval is not lost.

Transport: the worker that runs a step (pipeline/executor.py `execute`) keeps the step's latest line in a small
file, `progress_file(logs, key)` under the run's logs folder; the runner reads the files of its running steps
about once a second while it waits for them and reports each as a "progress" event. A file needs no pool
initializer, no extra process and no socket, works the same for a local worker process and for a Ray worker on
this machine, and on a node that does not share the logs folder the first write fails and progress is simply off.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

SEND_INTERVAL_S = 0.5  # the runner reads once a second: twice that is fresh enough, and costs nothing

_listening = False
_latest: str | None = None  # the line update() stored last; the sender thread passes it on


def update(text: str) -> None:
    """Say what the running step is doing now, in one short line."""
    global _latest
    if _listening:
        _latest = text


@contextmanager
def listening(listener: Callable[[str], None], interval: float = SEND_INTERVAL_S) -> Iterator[None]:
    """While the block runs (one step), pass update's latest line to listener, at most every interval seconds
    and only when it changed; a listener that raises gets nothing more. Nothing is sent after the block."""
    global _listening, _latest
    stop = threading.Event()

    def send() -> None:
        sent = None
        while not stop.wait(interval):
            line = _latest
            if line is not None and line != sent:
                sent = line
                try:
                    listener(" ".join(str(line).split())[:200])  # one line, whatever the caller passed
                except Exception:  # noqa: BLE001 - progress must never fail the step it describes
                    return

    _latest, _listening = None, True
    sender = threading.Thread(target=send, name="kiln-progress", daemon=True)
    sender.start()
    try:
        yield
    finally:
        _listening, _latest = False, None
        stop.set()
        sender.join()


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

    def write(text: str) -> None:  # an OSError (no such folder here) ends sending for this step
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)

    try:
        with listening(write):
            yield
    finally:  # after the sender has stopped, so nothing writes the file again
        path.unlink(missing_ok=True)


def read(path: Path) -> str | None:
    """The latest line in a progress file, or None when there is none yet."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
