from __future__ import annotations

import json
import os
import shutil

import pytest

from pipeline.deliver import BundleTaken, deliver
from pipeline.hashing import sha256_file
from pipeline.store import Store


def _build(store: Store, key: str, content: bytes = b"hello"):
    folder = store.begin(key)
    (folder / "out" / "a.bin").write_bytes(content)
    (folder / "out" / "sub").mkdir()
    (folder / "out" / "sub" / "b.txt").write_text("b")
    return store.commit(key, folder, {"stage": "test"})


def test_commit_then_lookup(tmp_path):
    store = Store(tmp_path)
    assert store.lookup("ab" * 32) is None
    entry = _build(store, "ab" * 32)
    found = store.lookup("ab" * 32)
    assert found is not None and found.output_hash == entry.output_hash
    assert set(found.meta["files"]) == {"a.bin", "sub/b.txt"}
    assert not any(store.tmp.iterdir())
    assert store.verify() == []


def test_output_hash_depends_on_content(tmp_path):
    store = Store(tmp_path)
    assert _build(store, "01" * 32, b"x").output_hash != _build(store, "02" * 32, b"y").output_hash
    assert _build(store, "03" * 32, b"x").output_hash == store.lookup("01" * 32).output_hash


def test_uncommitted_build_is_invisible_and_cleaned(tmp_path):
    store = Store(tmp_path)
    folder = store.begin("cd" * 32)
    (folder / "out" / "half.bin").write_bytes(b"half")
    assert store.lookup("cd" * 32) is None
    # a folder owned by a dead process (pid 2**22 + 1 is above the default pid_max) is stale
    dead = store.tmp / f"{'ef' * 32}.{2**22 + 1}.deadbeef"
    dead.mkdir()
    assert store.clean_stale() == 1  # ours is alive and kept
    assert folder.exists() and not dead.exists()


def test_damaged_entry_is_a_miss_and_is_replaced(tmp_path):
    store = Store(tmp_path)
    entry = _build(store, "aa" * 32)
    (entry.out / "a.bin").write_bytes(b"truncated!")  # size changed by hand
    assert store.verify()
    assert store.lookup("aa" * 32) is None and store.evicted == {"aa" * 32: "a.bin"}
    _build(store, "aa" * 32)
    assert store.lookup("aa" * 32) is not None and store.verify() == []


def test_same_size_tampering_is_found_by_verify(tmp_path):
    store = Store(tmp_path)
    entry = _build(store, "bb" * 32, b"12345")
    (entry.out / "a.bin").write_bytes(b"54321")
    assert any("sha256 differs" in p for p in store.verify())


def test_concurrent_writers_of_one_key_keep_the_first(tmp_path):
    store = Store(tmp_path)
    first, second = store.begin("dd" * 32), store.begin("dd" * 32)
    for folder in (first, second):
        (folder / "out" / "x").write_text("same")
    a = store.commit("dd" * 32, first, {"n": 1})
    b = store.commit("dd" * 32, second, {"n": 2})
    assert a.meta["n"] == 1 and b.meta["n"] == 1
    assert not second.exists()


def _bundle(path, text, recipe="r1"):
    """A bundle as publish makes one: manifest.json lists every file with its sha256, and the recipe's digest."""
    path.mkdir(parents=True)
    (path / "model.onnx").write_text(text)
    files = {"model.onnx": {"sha256": sha256_file(path / "model.onnx"), "bytes": len(text)}}
    (path / "manifest.json").write_text(json.dumps({"v": text, "recipe": {"sha256": recipe}, "files": files}))
    return path


def _visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_deliver_publishes_once_and_never_replaces(tmp_path):
    dest = tmp_path / "bundles" / "r" / "v1"
    assert deliver(_bundle(tmp_path / "one", "1"), dest) == "published"
    assert deliver(tmp_path / "one", dest) == "identical"
    with pytest.raises(BundleTaken, match="another recipe"):
        deliver(_bundle(tmp_path / "two", "2", recipe="r2"), dest)
    assert deliver(_bundle(tmp_path / "again", "1 rebuilt"), dest) == "kept"  # same recipe, other bytes
    assert (dest / "model.onnx").read_text() == "1"
    assert _visible(dest.parent) == ["v1"]


def test_deliver_interrupted_copy_publishes_nothing(tmp_path, monkeypatch):
    dest = tmp_path / "b" / "v1"

    def dying_copytree(src, dst, *args, **kwargs):
        os.makedirs(dst)
        shutil.copy2(os.path.join(src, "model.onnx"), dst)
        raise KeyboardInterrupt  # the run is stopped mid-copy, before manifest.json

    monkeypatch.setattr(shutil, "copytree", dying_copytree)
    with pytest.raises(KeyboardInterrupt):
        deliver(_bundle(tmp_path / "one", "1"), dest)
    monkeypatch.undo()
    assert not dest.exists() and _visible(dest.parent) == []
    killed = dest.parent / f".v1.tmp.{2**22 + 1}.dead"  # what a SIGKILL mid-copy leaves (a dead pid)
    killed.mkdir()
    assert deliver(tmp_path / "one", dest) == "published"
    assert (dest / "model.onnx").read_text() == "1"
    assert not killed.exists() and _visible(dest.parent) == ["v1"]


def test_an_optional_step_that_fails_leaves_its_consumer_running_without_it(tmp_path, monkeypatch):
    """Tuning candidates are optional: one that cannot be built is reported, its own dependents fail with it,
    and the tune step still runs on the others (told why each missing one is missing); the recipe passes."""
    import stages
    from pipeline.executor import InlineExecutor
    from pipeline.mlflow_registry import SourceRef
    from pipeline.plan import RecipePlan, Step
    from pipeline.recipe import Recipe
    from pipeline.runner import Runner
    from pipeline.settings import Settings

    from fixtures.toy_stages import Config

    monkeypatch.setitem(stages.STAGES, "toy", "fixtures.toy_stages")
    steps = [
        Step("r", "toy.good", Config(role="make", name="good"), optional=True),
        Step("r", "toy.bad", Config(role="make", name="bad", fail=True), optional=True),
        Step("r", "toy.after-bad", Config(role="make", name="after-bad"), {"base": "r:toy.bad"}, optional=True),
        Step("r", "toy.collect", Config(role="collect"),
             {"cand.good": "r:toy.good", "cand.bad": "r:toy.bad", "cand.after": "r:toy.after-bad"}),
    ]
    recipe = Recipe.model_validate({"name": "r", "source": {"uri": "models:/m/1"}})
    source = SourceRef("models:/m/1", "sqlite://", "m", "1", None, "", 0)
    plan = RecipePlan(recipe, tmp_path / "r.yaml", source, steps, tmp_path / "bundle")
    summary = Runner(Settings(tmp_path / "artifacts"), InlineExecutor()).run([plan])
    (outcome,) = summary.recipes
    status = {s.step: s.status for s in outcome.steps}
    assert outcome.status == "passed" and summary.exit_code == 0
    assert status == {"r:toy.good": "ran", "r:toy.bad": "failed", "r:toy.after-bad": "failed", "r:toy.collect": "ran"}
    collect = next(s for s in outcome.steps if s.step == "r:toy.collect")
    collected = json.loads((Store(tmp_path / "artifacts" / "store").lookup(collect.key).out / "collected.json").read_text())
    assert collected["seen"] == {"cand.good": "good"}
    assert collected["missing"]["cand.bad"] == "r:toy.bad: bad cannot be built"
    assert collected["missing"]["cand.after"].startswith("r:toy.after-bad: r:toy.bad: bad cannot be built")
