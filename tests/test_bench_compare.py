"""The side-by-side benchmark harness still runs end to end (not a timed test): one model, one quick repeat, every
tool row present, parity checked on each row that ran, failures carried as rows with their error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, base_env

pytestmark = pytest.mark.slow


def test_quick_digits_run_writes_every_tool_row(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/compare.py", "--models", "digits", "--repeats", "1", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, env=base_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "compare.json").read_text())
    (result,) = report["results"]
    assert list(result["tools"]) == ["eager", "compiled", "ort", "olive", "optimum", "kiln"]
    for name, row in result["tools"].items():
        if row["status"] == "ok":
            assert row["parity"]["mean_cosine"] > 0.99, (name, row["parity"])
            assert row["latency"]["1"]["p50_ms"] > 0 and row["latency"]["32"]["p50_ms"] > 0
        else:
            assert row["error"], name
    for name in ("eager", "ort", "olive", "kiln"):  # these need nothing beyond .venv
        assert result["tools"][name]["status"] == "ok", result["tools"][name]["error"]
    assert result["kiln"]["warm_steps_ran"] == 0 and result["best_peer"]["1"]["ratio"] > 0
    # kiln's row is the tuned winner, and it meets the parity bar the peers are held to
    assert result["kiln"]["selected"] == "tuned" and result["best_peer"]["1"]["kiln_passes_bar"]
    assert result["best_peer"]["1"]["framework"] in ("torch eager", "torch.compile")
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "digits-cnn" in (tmp_path / "compare.md").read_text()
