"""Issue 18, rows 1, 3 and 4: a tampered store never ships, bundles are immutable and delivered race-free,
workers die with their runner."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, base_env, process_alive
from pipeline.deliver import BundleTaken, deliver
from pipeline.store import Store


# --- row 4: workers die with their runner ---------------------------------------------------------------------

_RUNNER = """
import os, time
from pipeline.executor import LocalProcessExecutor
pool = LocalProcessExecutor(2)._ensure()
print(*sorted({pool.submit(os.getpid).result() for _ in range(8)}), flush=True)
pool.submit(time.sleep, 300)  # a long step, running when the runner is killed
time.sleep(300)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_runner_leaves_no_worker_alive(tmp_path):
    runner = subprocess.Popen([sys.executable, "-c", _RUNNER], cwd=ROOT, env=base_env(), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        workers = [int(pid) for pid in runner.stdout.readline().split()]
        assert workers and all(process_alive(pid) for pid in workers)
        time.sleep(0.5)  # the sleep(300) task is running in a worker now
        os.kill(runner.pid, signal.SIGKILL)  # the runner only, not its process group
        runner.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(process_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if process_alive(pid)], "workers outlived their runner"
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- row 1: the store is trusted only as far as it is verified --------------------------------------------------

KEY = "ab" * 32


def _build(store, key: str = KEY, content: bytes = b"model-bytes"):
    folder = store.begin(key)
    (folder / "out" / "model.onnx").write_bytes(content)
    (folder / "out" / "sub").mkdir()
    (folder / "out" / "sub" / "spec.json").write_text("{}")
    return store.commit(key, folder, {"stage": "test"})


def _flip_one_byte(path: Path, keep_mtime: bool = False) -> None:
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))  # same size
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_a_same_size_edit_of_a_cached_file_evicts_the_entry(tmp_path, keep_mtime):
    store = Store(tmp_path)
    entry = _build(store)
    assert store.lookup(KEY) is not None
    _flip_one_byte(entry.out / "model.onnx", keep_mtime)
    assert store.lookup(KEY) is None  # never reused
    assert store.evicted == {KEY: "model.onnx"}
    assert not entry.path.exists() and store.verify() == []  # gone, not left damaged
    rebuilt = _build(store)
    assert store.lookup(KEY) is not None and (rebuilt.out / "model.onnx").read_bytes() == b"model-bytes"


def test_untouched_files_are_not_hashed_again(tmp_path, monkeypatch):
    import pipeline.store as store_module

    store = Store(tmp_path)
    entry = _build(store)
    hashed = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    for _ in range(3):
        assert store.lookup(KEY) is not None
    assert hashed == []  # verified at commit, stamps unchanged since
    os.utime(entry.out / "model.onnx")  # touched, content kept: hashed once more, then trusted again
    assert store.lookup(KEY) is not None and store.lookup(KEY) is not None
    assert hashed == ["model.onnx"]


def test_a_mirrored_store_pulls_a_tampered_local_copy_again(tmp_path):
    from pipeline import open_store

    url = (tmp_path / "shared").as_uri()
    _build(open_store(tmp_path / "one", url))
    two = open_store(tmp_path / "two", url)
    local = two.lookup(KEY)
    _flip_one_byte(local.out / "model.onnx")
    again = two.lookup(KEY)
    assert again is not None and (again.out / "model.onnx").read_bytes() == b"model-bytes"
    assert two.evicted == {KEY: "model.onnx"}


def test_a_step_input_is_verified_by_the_worker_before_use(tmp_path):
    from pipeline.errors import StageCrashed
    from pipeline.executor import Task, _inputs

    store = Store(tmp_path)
    entry = _build(store)
    task = Task(step_id="r:optimize", stage="optimize", key="cd" * 32, config={}, inputs={"onnx": str(entry.out)},
                input_hashes={"onnx": entry.output_hash}, context={}, tools={}, store_root=str(tmp_path),
                logs=str(tmp_path / "logs"), input_keys={"onnx": KEY})
    assert _inputs(task, Store(tmp_path)) == {"onnx": entry.out}
    _flip_one_byte(entry.out / "sub" / "spec.json")  # damaged after the runner looked it up
    with pytest.raises(StageCrashed, match=r"input onnx .*sub/spec.json no longer matches its recorded sha256"):
        _inputs(task, Store(tmp_path))


def test_the_runner_rebuilds_a_tampered_entry_and_says_so(tmp_path, monkeypatch):
    import stages
    from fixtures.toy_stages import Config
    from pipeline.executor import InlineExecutor
    from pipeline.mlflow_registry import SourceRef
    from pipeline.plan import RecipePlan, Step
    from pipeline.recipe import Recipe
    from pipeline.runner import Runner
    from pipeline.settings import Settings

    monkeypatch.setitem(stages.STAGES, "toy", "fixtures.toy_stages")
    steps = [Step("r", "toy.make", Config(role="make", name="weights")),
             Step("r", "toy.collect", Config(role="collect"), {"cand.x": "r:toy.make"})]
    recipe = Recipe.model_validate({"name": "r", "source": {"uri": "models:/m/1"}})
    plan = RecipePlan(recipe, tmp_path / "r.yaml", SourceRef("models:/m/1", "sqlite://", "m", "1", None, "", 0),
                      steps, tmp_path / "bundle")
    settings = Settings(tmp_path / "artifacts")
    first = Runner(settings, InlineExecutor()).run([plan]).recipes[0]
    make = Store(settings.store_root).lookup(first.steps[0].key)
    _flip_one_byte(make.out / "value.txt")
    said = []
    again = Runner(settings, InlineExecutor(), lambda kind, o: said.append((kind, o.step, o.evicted))).run([plan])
    status = {s.step: (s.status, s.evicted) for s in again.recipes[0].steps}
    assert status == {"r:toy.make": ("ran", "value.txt"), "r:toy.collect": ("cached", None)}  # same bytes again
    assert ("evicted", "r:toy.make", "value.txt") in said
    assert (Store(settings.store_root).lookup(first.steps[0].key).out / "value.txt").read_text() == "weights"


# --- row 3: bundles are immutable, delivery is race-free -------------------------------------------------------

def _bundle(path: Path, text: str, recipe: str) -> Path:
    from pipeline.hashing import sha256_file

    (path / "serving").mkdir(parents=True)
    (path / "model.onnx").write_text(text)
    (path / "serving" / "config.pbtxt").write_text(f"name: {text}")
    files = {rel: {"sha256": sha256_file(path / rel), "bytes": (path / rel).stat().st_size}
             for rel in ("model.onnx", "serving/config.pbtxt")}
    (path / "manifest.json").write_text(json.dumps({"recipe": {"sha256": recipe}, "files": files}))
    return path


def test_a_tampered_bundle_file_is_not_delivered(tmp_path):
    from pipeline.errors import KilnError

    src = _bundle(tmp_path / "src", "weights", "a" * 64)
    _flip_one_byte(src / "serving" / "config.pbtxt")
    with pytest.raises(KilnError, match=r"serving/config.pbtxt: does not match the sha256 in its manifest"):
        deliver(src, tmp_path / "bundles" / "r" / "v1")
    assert [p.name for p in (tmp_path / "bundles" / "r").iterdir() if not p.name.startswith(".")] == []


def test_another_recipe_gets_its_own_folder(tmp_path):
    from pipeline.deliver import version_folder

    root = tmp_path / "bundles" / "r"
    a, b = "a" * 64, "b" * 64
    assert version_folder(root, "3", a) == root / "v3"
    deliver(_bundle(tmp_path / "a", "A", a), root / "v3")
    assert version_folder(root, "3", a) == root / "v3"  # the same recipe again: already there
    assert version_folder(root, "3", b) == root / f"v3-{b[:12]}"
    assert version_folder(root, "4", b) == root / "v4"


def _racer(barrier, root: str, src: str, rounds: int, results) -> None:
    from pipeline.deliver import recipe_of, version_folder

    sha = recipe_of(Path(src))
    for i in range(rounds):
        barrier.wait()
        folder = Path(root) / f"r{i}"
        try:
            try:
                status = deliver(Path(src), dest := version_folder(folder, "1", sha))
            except BundleTaken:  # what the runner does: plan again, for this recipe's own folder
                status = deliver(Path(src), dest := version_folder(folder, "1", sha))
            results.put((i, status, dest.name))
        except Exception as exc:  # noqa: BLE001 - counted as a failure by the test
            results.put((i, f"{type(exc).__name__}: {exc}", None))


def _race(tmp_path: Path, sources: list[Path], rounds: int) -> dict[int, list]:
    context = multiprocessing.get_context("fork")  # this test process imports nothing heavy; fork is safe
    barrier, results = context.Barrier(len(sources)), context.Queue()
    procs = [context.Process(target=_racer, args=(barrier, str(tmp_path / "bundles"), str(src), rounds, results))
             for src in sources]
    for proc in procs:
        proc.start()
    got: dict[int, list] = {}
    for _ in range(rounds * len(sources)):
        i, status, name = results.get(timeout=120)
        got.setdefault(i, []).append((status, name))
    for proc in procs:
        proc.join(timeout=30)
    return got


def test_300_races_of_two_different_builds_give_two_immutable_versions(tmp_path):
    a, b = "a" * 64, "b" * 64
    got = _race(tmp_path, [_bundle(tmp_path / "a", "A", a), _bundle(tmp_path / "b", "B", b)], 300)
    failures = [(i, r) for i, r in got.items() if sorted(r) not in (
        [("published", "v1"), ("published", f"v1-{a[:12]}")], [("published", "v1"), ("published", f"v1-{b[:12]}")])]
    assert failures == [] and len(got) == 300
    from pipeline.deliver import recipe_of

    for i in range(300):
        folder = tmp_path / "bundles" / f"r{i}"
        held = {p.name: recipe_of(p) for p in folder.iterdir() if not p.name.startswith(".")}
        assert sorted(held.values()) == [a, b]  # each build whole in its own folder
        plain = held["v1"]
        assert (folder / "v1" / "model.onnx").read_text() == ("A" if plain == a else "B")


def test_the_same_build_delivered_twice_at_once_is_already_identical(tmp_path):
    src = _bundle(tmp_path / "a", "A", "a" * 64)
    got = _race(tmp_path, [src, src], 100)
    assert all(sorted(r) == [("identical", "v1"), ("published", "v1")] for r in got.values()), got


# --- row 1 through the real CLI ----------------------------------------------------------------------------------

def _entry_out(artifacts: Path, summary: dict, stage: str) -> Path:
    (step,) = [s for r in summary["recipes"] for s in r["steps"] if s["stage"] == stage]
    return artifacts / "store" / "steps" / step["key"][:2] / step["key"] / "out"


@pytest.mark.slow
def test_kiln_run_rebuilds_a_tampered_model_and_input_and_publishes_a_correct_bundle(registry, tmp_path):
    from conftest import RECIPES, kiln, run_json, write_recipe
    from pipeline.hashing import sha256_file

    artifacts = tmp_path / "artifacts"
    recipe = write_recipe(tmp_path / "digits-cnn.yaml", RECIPES / "digits-cnn.yaml", {})
    result, first = run_json(str(recipe), "--tracking-uri", registry, "--artifacts", str(artifacts))
    assert result.returncode == 0, result.stderr[-3000:]
    optimized = _entry_out(artifacts, first, "optimize") / "model.onnx"
    good = optimized.read_bytes()
    _flip_one_byte(optimized)  # the model the bundle publishes
    _flip_one_byte(_entry_out(artifacts, first, "export") / "model.onnx")  # optimize's cached input
    # A gate edit: publish runs again, and would copy the damaged model into a bundle that PASSED.
    edited = write_recipe(tmp_path / "edited.yaml", recipe, {"min_top1: 0.99": "min_top1: 0.98"})
    result, summary = run_json(str(edited), "--tracking-uri", registry, "--artifacts", str(artifacts))
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if line.startswith("kiln store:")]
    assert "kiln store: digits-cnn:export: cached model.onnx does not match its recorded sha256" in said[0], said
    steps = {s["stage"]: s for s in summary["recipes"][0]["steps"]}
    assert steps["export"]["evicted"] == "model.onnx" and steps["export"]["status"] == steps["optimize"]["status"] == "ran"
    if steps["optimize"]["key"] == optimized.parent.parent.name:  # export gave the same bytes again
        assert steps["optimize"]["evicted"] == "model.onnx" and len(said) == 2, said
    outcome = summary["recipes"][0]
    bundle = Path(outcome["bundle"])
    assert outcome["status"] == "passed" and outcome["delivered"] and bundle.name.startswith("v1-")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["gates"]["passed"] and manifest["recipe"]["sha256"].startswith(bundle.name[3:])
    for rel, info in manifest["files"].items():
        assert sha256_file(bundle / rel) == info["sha256"]
    assert (bundle / "model.onnx").read_bytes() == _entry_out(artifacts, summary, "optimize").joinpath("model.onnx").read_bytes()
    assert (bundle / "model.onnx").read_bytes() != _flipped(good)
    first_bundle = Path(first["recipes"][0]["bundle"])
    assert first_bundle.name == "v1" and json.loads((first_bundle / "manifest.json").read_text())["recipe"]["sha256"] \
        != manifest["recipe"]["sha256"]  # the first build's v1 is untouched
    assert kiln("verify-store", "--artifacts", str(artifacts)).returncode == 0


def _flipped(data: bytes) -> bytes:
    data = bytearray(data)
    data[len(data) // 2] ^= 0x01
    return bytes(data)


def test_a_build_whose_folder_another_recipe_published_meanwhile_is_planned_again(tmp_path, monkeypatch):
    """Two different builds of one source version planned at once both aim at v1; the one that delivers second
    is planned again by the runner and publishes into a folder of its own."""
    import stages
    from fixtures.toy_bundle import RIVAL
    from pipeline.deliver import recipe_of
    from pipeline.executor import InlineExecutor
    from pipeline.mlflow_registry import SourceRef
    from pipeline.plan import plan_recipe
    from pipeline.recipe import Recipe
    from pipeline.runner import Runner
    from pipeline.settings import Settings

    monkeypatch.setattr(stages, "STAGES", {"toy_bundle": "fixtures.toy_bundle"})
    recipe = Recipe.model_validate({"name": "r", "source": {"uri": "models:/m/1"}})
    source = SourceRef("models:/m/1", "sqlite://", "m", "1", None, "", 0)
    settings = Settings(tmp_path / "artifacts")
    plan = plan_recipe(recipe, tmp_path / "r.yaml", source, settings)
    assert plan.bundle_dest.name == "v1"
    (outcome,) = Runner(settings, InlineExecutor()).run([plan]).recipes
    folder = settings.bundles / "r"
    assert outcome.status == "passed" and outcome.delivered
    assert Path(outcome.bundle) == folder / f"v1-{plan.steps[0].config.recipe_sha256[:12]}"
    assert recipe_of(folder / "v1") == RIVAL and (folder / "v1" / "model.onnx").read_text() == "rival build"
    assert recipe_of(Path(outcome.bundle)) == plan.steps[0].config.recipe_sha256
