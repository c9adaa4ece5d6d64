"""Progress and a quiet console: pipeline/progress.py on its own (fast), then through the real `kiln run`
(slow): third-party log lines stay out of the console unless --verbose, and a long step shows its progress."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline import progress
from tests.conftest import RECIPES, base_env, derive_recipe, kiln


def test_update_without_a_listener_does_nothing():
    progress.update("nobody listens")  # no error, no thread, nothing stored
    assert progress._latest is None
    sent: list[str] = []
    with progress.listening(sent.append, interval=0.05):
        pass
    assert sent == []  # a line from before the step is not sent as the step's


def test_lines_are_sent_at_most_every_interval_and_the_latest_wins():
    sent: list[str] = []
    with progress.listening(sent.append, interval=0.2):
        started = time.monotonic()
        while time.monotonic() - started < 0.5:  # a hot loop reporting every iteration
            progress.update(f"run {time.monotonic()}")
        progress.update("phase two\n  of two")
        time.sleep(0.35)
    assert 2 <= len(sent) <= 4, sent  # a few lines, not thousands
    assert sent[-1] == "phase two of two"  # the latest line, on one line, was not dropped
    progress.update("after the step")
    time.sleep(0.25)
    assert sent[-1] == "phase two of two"


def test_update_is_safe_from_any_thread_and_a_failing_listener_is_dropped():
    calls = []

    def broken(line):
        calls.append(line)
        raise OSError("no such folder on this node")

    with progress.listening(broken, interval=0.05):
        threads = [threading.Thread(target=lambda i=i: [progress.update(f"t{i}") for _ in range(1000)]) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(0.2)
        progress.update("more")
        time.sleep(0.2)
    assert len(calls) == 1  # it raised once, then nothing more was sent


def test_to_file_keeps_the_latest_line_and_removes_it_after(tmp_path):
    path = progress.progress_file(tmp_path, "ab" * 32)
    path.parent.mkdir()
    with progress.to_file(path):
        progress.update("fallback round 1 of 4")
        deadline = time.monotonic() + 5
        while progress.read(path) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert progress.read(path) == "fallback round 1 of 4"
    assert not path.exists()
    with progress.to_file(tmp_path / "not-here" / "x.txt"):  # a worker that cannot reach the logs folder
        progress.update("lost quietly")
        time.sleep(0.7)


THIRD_PARTY = ("oneDNN", "absl::", "I0000 ", "W0000 ", "TF_ENABLE_ONEDNN_OPTS", "cuda", "tensorflow/")


def _chatter(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(marker in line for marker in THIRD_PARTY)]


@pytest.mark.slow
def test_keras_run_is_quiet_unless_verbose_and_shows_progress(registry, tmp_path):
    # A recipe of its own: kiln publishes one bundle per recipe name and version into these artifacts.
    recipe = derive_recipe(tmp_path / "quiet-keras.yaml", RECIPES / "digits-keras.yaml",
                           {"name": "quiet-keras", "serving": {"targets": ["triton"]}})
    quiet = kiln("run", "--json", str(recipe), "--artifacts", str(tmp_path / "quiet"), "--tracking-uri", registry,
                 env=base_env(KILN_PROGRESS_INTERVAL="0"))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.lstrip().startswith("{") and quiet.stdout.rstrip().endswith("}")  # pure JSON
    assert _chatter(quiet.stderr) == [], quiet.stderr
    # What TensorFlow said went to the export step's log instead.
    logs = list((tmp_path / "quiet" / "logs").glob("export-*.log"))
    assert logs and "oneDNN" in logs[0].read_text()
    # Not a terminal: progress comes as plain lines (every KILN_PROGRESS_INTERVAL seconds; here at every poll).
    export = [line.split("s  ", 1)[-1] for line in quiet.stderr.splitlines() if line.startswith("  … quiet-keras:export")]
    assert set(export) & {"loading the tensorflow model", "converting to ONNX (opset 17)"}, quiet.stderr
    assert "✓ quiet-keras:export" in quiet.stderr  # and the elapsed time when it finished, as before

    loud = kiln("run", "--verbose", str(recipe), "--artifacts", str(tmp_path / "loud"), "--tracking-uri", registry)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert any("oneDNN" in line for line in _chatter(loud.stderr)), loud.stderr
