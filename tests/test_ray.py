"""`--executor ray` against a real local Ray cluster (started here with ray.init, no dashboard, 2 CPUs): the same
bundles as the local executor, workers that share no disk but the store URL, a worker killed mid-step, and a
step that needs a GPU this cluster does not have."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import RECIPES, ROOT, base_env, derive_recipe, kiln, run_json, steps_by_status
from pipeline.hashing import sha256_file
from pipeline.remote_store import RemoteStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Files that hold latency measurements (which differ between any two runs, on any executor).
MEASURED = {"manifest.json", "report.md", "report.html", "plots/latency.png"}
DETERMINISTIC_STEPS = ("fetch", "data", "export", "optimize", "validate")  # keys up to validate are input-only


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray cluster on this machine for the module; yields the address other drivers (the kiln CLI) join."""
    import ray

    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _digits(folder: Path, name: str, **changes) -> Path:
    """The digits CNN recipe with no serving targets and the shortest latency measurement."""
    base = {"name": name, "serving": {"targets": []},
            "validation": {"latency": {"batch_sizes": [1], "iterations": 100, "time_budget_s": 2}}}
    return derive_recipe(folder / f"{name}.yaml", RECIPES / "digits-cnn.yaml", {**base, **changes})


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    """Three recipes over one model: b shares every step with a up to validate, c up to export."""
    folder = tmp_path_factory.mktemp("recipes")
    _digits(folder, "digits-a")
    _digits(folder, "digits-b", gates={"parity": {"default": {"min_top1": 0.98}}})
    _digits(folder, "digits-c", optimize={"level": "basic"})
    return folder


def _ray_env(tmp: Path) -> dict[str, str]:
    return base_env(KILN_RAY_WORKER_CACHE=str(tmp / "worker-cache"))


def _bundle_files(bundle: Path) -> dict[str, str]:
    return {p.relative_to(bundle).as_posix(): sha256_file(p) for p in sorted(bundle.rglob("*")) if p.is_file()}


def _bundles_whole(artifacts: Path) -> int:
    count = 0
    for manifest in (artifacts / "bundles").glob("*/v*/manifest.json"):
        for rel, info in json.loads(manifest.read_text())["files"].items():
            assert sha256_file(manifest.parent / rel) == info["sha256"], f"partial bundle {manifest.parent}"
        count += 1
    return count


def test_ray_builds_the_same_bundles_as_the_local_executor(ray_cluster, registry, recipes, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    shared = (tmp_path / "shared-store").as_uri()  # the only place the workers and the runner share
    result, by_local = run_json(str(recipes), "--tracking-uri", registry, "--artifacts", str(local))
    assert result.returncode == 0, result.stderr
    started = time.monotonic()
    result, by_ray = run_json(str(recipes), "--tracking-uri", registry, "--artifacts", str(remote),
                              "--executor", f"ray={ray_cluster}", "--store-url", shared,
                              env=_ray_env(tmp_path), timeout=400)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 400

    assert [r["status"] for r in by_ray["recipes"]] == ["passed"] * 3
    for outcome in by_local["recipes"]:
        name = outcome["recipe"]
        ours = Path(outcome["bundle"])
        theirs = remote / "bundles" / name / f"v{outcome['version']}"
        a, b = _bundle_files(ours), _bundle_files(theirs)
        assert set(a) == set(b), name
        same = {rel for rel in a if rel not in MEASURED}
        assert "model.onnx" in same and "session_config.json" in same
        assert {rel: a[rel] for rel in same} == {rel: b[rel] for rel in same}, name
        ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (ours, theirs))
        keys = lambda m: {s["stage"]: s["key"] for s in m["steps"] if s["stage"] in DETERMINISTIC_STEPS}  # noqa: E731
        assert keys(ma) == keys(mb), name
        assert ma["metrics"]["outputs"] == mb["metrics"]["outputs"]  # parity: same numbers
        assert ma["gates"]["passed"] and mb["gates"]["passed"]

    # Every step ran in a Ray worker that read and wrote only through the store URL: each shared entry says
    # which worker built it, the runner's own store holds copies pulled from there, and shared steps ran once.
    store = RemoteStore(shared)
    assert store.verify() == []
    keys_run = {s["key"] for r in by_ray["recipes"] for s in r["steps"]}
    assert len(keys_run) == 7 + 2 + 4  # b reuses a's first five steps, c a's first three
    assert len(list((tmp_path / "shared-store" / "steps").glob("*/*.json"))) == len(keys_run)
    metas = [store.meta(key) for key in keys_run]
    assert all(m is not None and m["worker"]["pid"] != os.getpid() for m in metas)  # only Ray workers say so
    assert len(list((tmp_path / "worker-cache").glob("*/steps/*/*/meta.json"))) >= 1
    verified = kiln("verify-store", "--artifacts", str(remote), env=_ray_env(tmp_path))
    assert verified.returncode == 0, verified.stderr

    # A second run through Ray is all cached.
    result, again = run_json(str(recipes), "--tracking-uri", registry, "--artifacts", str(remote),
                             "--executor", f"ray={ray_cluster}", "--store-url", shared, env=_ray_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert steps_by_status(again, "ran") == []


def _step_worker(title: str, deadline: float) -> psutil.Process:
    """The Ray worker process running the task named `title` (Ray titles it `ray::<task name>`)."""
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            if (process.info["cmdline"] or [""])[0].startswith(f"ray::{title}"):
                return process
        time.sleep(0.1)
    raise AssertionError(f"no Ray worker ran {title}")


def test_a_worker_killed_mid_step_is_retried_and_leaves_nothing_partial(ray_cluster, registry, tmp_path):
    # A fixed, long measurement (no early stop on a precise p50): on a quiet machine 300 runs were over before
    # the kill, so validate must outlast the 2 s wait below many times over (8000 x 2 runtimes x 2 batches).
    recipe = _digits(tmp_path, "digits-kill", validation={"latency": {"batch_sizes": [1, 32], "iterations": 8000,
                                                                       "max_iterations": 8000, "target_ci": None}})
    artifacts, shared = tmp_path / "artifacts", (tmp_path / "shared-store").as_uri()
    args = [sys.executable, "-m", "pipeline", "run", "--json", str(recipe), "--tracking-uri", registry,
            "--artifacts", str(artifacts), "--executor", f"ray={ray_cluster}", "--store-url", shared]
    run = subprocess.Popen(args, cwd=ROOT, env=_ray_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        victim = _step_worker("digits-kill:validate", time.monotonic() + 240)
        time.sleep(2.0)  # well into the step: the model is loaded and being measured
        assert victim.cmdline()[0].startswith("ray::digits-kill:validate"), "the step ended before the kill"
        killed = victim.pid
        os.kill(killed, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=400)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["recipes"][0]["status"] == "passed"
    assert "digits-kill:validate" in steps_by_status(summary, "ran")

    validate = next(s for s in summary["recipes"][0]["steps"] if s["stage"] == "validate")
    meta = RemoteStore(shared).meta(validate["key"])
    assert meta["worker"]["pid"] != killed  # a second attempt, in another worker process, built it
    assert RemoteStore(shared).verify() == []
    verified = kiln("verify-store", "--artifacts", str(artifacts), env=base_env(KILN_STORE_URL=shared))
    assert verified.returncode == 0, verified.stderr
    assert _bundles_whole(artifacts) == 1
    # The killed attempt's private build folder was removed by the retry, not committed anywhere.
    assert not [p for p in (tmp_path / "worker-cache").glob("*/tmp/*") if f".{killed}." in p.name]
    assert not list((tmp_path / "shared-store").rglob("*.tmp"))


def test_a_step_no_node_can_take_fails_its_recipes_at_once(ray_cluster, registry, tmp_path):
    """A cuda tuning step ({"num_gpus": 1, "target:cuda": 1}) on this CPU-only cluster: unschedulable, one line,
    no wait; the recipe that needs it fails and the other recipe in the run is published."""
    from pipeline.build import build, plan_all
    from pipeline.settings import Settings

    folder = tmp_path / "recipes"
    folder.mkdir()
    _digits(folder, "digits-gpu", optimize={"level": "basic"})
    _digits(folder, "digits-cpu")
    settings = Settings(tmp_path / "artifacts", registry, executor="ray", store_url=(tmp_path / "shared").as_uri())
    plans = plan_all([folder], settings)
    gpu = next(p for p in plans if p.name == "digits-gpu")
    step = next(s for s in gpu.steps if s.stage == "optimize")
    step.resources = {"num_gpus": 1, "target:cuda": 1}
    started = time.monotonic()
    summary = build(plans, settings, warn=lambda message: None)  # joins the module's cluster in this process
    assert time.monotonic() - started < 300
    outcomes = {r.recipe: r for r in summary.recipes}
    assert outcomes["digits-cpu"].status == "passed" and outcomes["digits-cpu"].delivered
    failed = outcomes["digits-gpu"]
    assert failed.status == "unschedulable" and failed.exit_code == 3 and summary.exit_code == 3
    assert "\n" not in failed.reason
    assert failed.reason.startswith("digits-gpu:optimize needs CPU=1, GPU=1, target:cuda=1")
    assert "no node of the Ray cluster offers that" in failed.reason
    assert {s.stage: s.status for s in failed.steps}["optimize"] == "failed"
    assert {s.stage: s.status for s in failed.steps}["publish"] == "skipped"
    assert failed.bundle is None and not (tmp_path / "artifacts" / "bundles" / "digits-gpu").exists()


def test_an_address_where_no_cluster_listens_is_refused_in_seconds(registry, tmp_path):
    recipe = _digits(tmp_path, "digits-nowhere")
    started = time.monotonic()
    result = kiln("run", str(recipe), "--tracking-uri", registry, "--artifacts", str(tmp_path / "a"),
                  "--executor", "ray=127.0.0.1:1", timeout=120)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 60
    lines = [line for line in result.stderr.splitlines() if line.startswith("kiln:")]
    assert lines == ["kiln: error: --executor ray=127.0.0.1:1: nothing answers at 127.0.0.1:1 (Connection refused); "
                     "start a cluster there with `ray start --head` or fix the address"]
