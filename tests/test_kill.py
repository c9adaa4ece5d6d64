"""A run killed with SIGKILL at any moment leaves a consistent store and no partial bundle; the next run completes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RECIPES, ROOT, base_env, kiln, process_alive
from pipeline.hashing import sha256_file

pytestmark = pytest.mark.slow


# Three demo recipes (PyTorch, Keras, a transformer encoder) give steps of every kind to be killed in.
KILLED = [str(RECIPES / f"{name}.yaml") for name in ("bert-encoder", "digits-cnn", "digits-keras")]


def _bundles_whole(artifacts: Path) -> int:
    count = 0
    for manifest_path in (artifacts / "bundles").glob("*/v*/manifest.json"):
        bundle = manifest_path.parent
        manifest = json.loads(manifest_path.read_text())
        assert (bundle / "report.md").is_file()
        for rel, info in manifest["files"].items():
            assert sha256_file(bundle / rel) == info["sha256"], f"partial bundle {bundle}"
        count += 1
    for folder in (artifacts / "bundles").glob("*/v*"):
        assert (folder / "manifest.json").is_file(), f"bundle folder without manifest: {folder}"
    return count


def test_sigkill_at_random_moments(registry, tmp_path):
    artifacts = tmp_path / "artifacts"
    rng = random.Random(int(os.environ.get("KILN_KILL_SEED", "7")))
    args = [sys.executable, "-m", "pipeline", "run", *KILLED, "--tracking-uri", registry,
            "--artifacts", str(artifacts)]
    for delay in sorted(rng.uniform(2.0, 16.0) for _ in range(3)):
        process = subprocess.Popen(args, cwd=ROOT, env=base_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGKILL)  # the runner and its workers, mid-whatever
        process.wait(timeout=30)
        time.sleep(0.5)
        verified = kiln("verify-store", "--artifacts", str(artifacts))
        assert verified.returncode == 0, verified.stderr
        _bundles_whole(artifacts)
    result = kiln("run", *KILLED, "--tracking-uri", registry, "--artifacts", str(artifacts))
    assert result.returncode == 0, result.stderr
    assert _bundles_whole(artifacts) == 3
    assert not any((artifacts / "store" / "tmp").iterdir())  # stale build folders were cleaned


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_sigkill_of_the_runner_alone_leaves_no_worker_alive(registry, tmp_path):
    """Only the runner is killed (not its process group): its workers must not finish their steps as orphans."""
    args = [sys.executable, "-m", "pipeline", "run", str(RECIPES), "--jobs", "2", "--tracking-uri", registry,
            "--artifacts", str(tmp_path / "artifacts")]
    process = subprocess.Popen(args, cwd=ROOT, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_children(process.pid)) < 2 and time.monotonic() < deadline:  # workers up, steps running
            time.sleep(0.5)
        time.sleep(3)
        workers = _children(process.pid)
        assert len(workers) >= 2, "the run started no worker processes"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        time.sleep(5)
        assert [pid for pid in workers if process_alive(pid)] == []
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
