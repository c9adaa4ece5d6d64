"""The shared step store at an fsspec URL: workers with their own caches, no shared folder between them but the
URL's; first complete write of a key wins; nothing half-uploaded is ever an entry."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from pipeline.errors import BadInput, KilnError
from pipeline.ray_executor import ray_needs, unschedulable
from pipeline.remote_store import RemoteStore
from pipeline import open_store

KEY = "ab" * 32


def _worker_store(tmp_path: Path, name: str, url: str):
    return open_store(tmp_path / name, url)


def _build(store, key: str, content: bytes):
    folder = store.begin(key)
    (folder / "out" / "model.bin").write_bytes(content)
    (folder / "out" / "sub").mkdir()
    (folder / "out" / "sub" / "summary.txt").write_text(content.decode()[:4])
    return store.commit(key, folder, {"stage": "test"})


def test_entry_built_by_one_worker_is_pulled_by_another(tmp_path):
    url = (tmp_path / "shared").as_uri()
    one, two = _worker_store(tmp_path, "one", url), _worker_store(tmp_path, "two", url)
    built = _build(one, KEY, b"weights-1")
    assert two.local.lookup(KEY) is None  # nothing in the second worker's own folder yet
    pulled = two.lookup(KEY)
    assert pulled is not None and pulled.path.is_relative_to(tmp_path / "two")
    assert pulled.output_hash == built.output_hash
    assert (pulled.out / "model.bin").read_bytes() == b"weights-1"
    assert (pulled.out / "sub" / "summary.txt").read_text() == "weig"
    assert one.verify() == [] and two.verify() == []


def test_second_writer_of_a_key_reuses_the_first(tmp_path):
    url = (tmp_path / "shared").as_uri()
    one, two = _worker_store(tmp_path, "one", url), _worker_store(tmp_path, "two", url)
    first = _build(one, KEY, b"first build")
    second = _build(two, KEY, b"other bytes")  # e.g. a step that measures time: same key, other output
    assert second.output_hash == first.output_hash
    assert (second.out / "model.bin").read_bytes() == b"first build"
    assert not any((tmp_path / "two" / "tmp").iterdir())  # its own copy was dropped


def test_a_local_entry_that_disagrees_with_the_shared_store_gives_way(tmp_path):
    url = (tmp_path / "shared").as_uri()
    _build(open_store(tmp_path / "one", url), KEY, b"shared first")
    plain = open_store(tmp_path / "two")  # built before this machine used the shared store
    _build(plain, KEY, b"local only")
    entry = open_store(tmp_path / "two", url).lookup(KEY)
    assert (entry.out / "model.bin").read_bytes() == b"shared first"


def test_local_entries_are_shared_when_first_looked_up(tmp_path):
    url = (tmp_path / "shared").as_uri()
    _build(open_store(tmp_path / "one"), KEY, b"built before")
    assert RemoteStore(url).meta(KEY) is None
    assert open_store(tmp_path / "one", url).lookup(KEY) is not None
    assert open_store(tmp_path / "two", url).lookup(KEY) is not None  # a worker elsewhere finds it


def _race(url: str, cache: str, content: bytes, start, results) -> None:
    store = open_store(Path(cache), url)
    folder = store.begin(KEY)
    (folder / "out" / "model.bin").write_bytes(content)
    start.wait()
    results.put(store.commit(KEY, folder, {"stage": "race"}).output_hash)


def test_concurrent_writers_of_one_key_agree_on_one_winner(tmp_path):
    url = (tmp_path / "shared").as_uri()
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_race, args=(url, str(tmp_path / f"w{i}"), f"build {i}".encode(), start, results))
               for i in range(4)]
    for worker in workers:
        worker.start()
    start.set()
    hashes = {results.get(timeout=60) for _ in workers}
    for worker in workers:
        worker.join(timeout=30)
    assert len(hashes) == 1  # every writer returned the same entry
    meta = RemoteStore(url).meta(KEY)
    assert meta["output_hash"] in hashes
    for i in range(4):  # and each worker's own cache holds that winner
        assert open_store(tmp_path / f"w{i}").lookup(KEY).output_hash == meta["output_hash"]


def test_blobs_without_meta_are_not_an_entry_and_damage_is_named(tmp_path):
    url = (tmp_path / "shared").as_uri()
    remote = RemoteStore(url)
    built = _build(open_store(tmp_path / "one", url), KEY, b"payload")
    meta_path = tmp_path / "shared" / "steps" / KEY[:2] / f"{KEY}.json"
    meta = json.loads(meta_path.read_text())
    meta_path.unlink()  # as if the uploader died after its blobs and before its meta
    assert remote.meta(KEY) is None and open_store(tmp_path / "two", url).lookup(KEY) is None
    meta_path.write_text(json.dumps(meta))
    blob = tmp_path / "shared" / "blobs" / built.meta["files"]["model.bin"]["sha256"][:2]
    (blob / built.meta["files"]["model.bin"]["sha256"]).write_bytes(b"paylod!")  # same size, other bytes
    with pytest.raises(KilnError, match="is damaged"):
        open_store(tmp_path / "three", url).lookup(KEY)
    assert not any((tmp_path / "three" / "tmp").iterdir())  # the failed pull left nothing behind


def test_a_url_that_cannot_serve_several_workers_is_refused(tmp_path):
    with pytest.raises(BadInput, match="one process only"):
        RemoteStore("memory://kiln")
    with pytest.raises(BadInput, match="fsspec cannot open it"):
        RemoteStore("nosuchprotocol://bucket/kiln")


def test_step_resources_in_ray_terms_and_unschedulable_reason():
    assert ray_needs({}) == {"CPU": 1.0}
    gpu = ray_needs({"num_gpus": 1, "target:cuda": 1, "memory": 2 * 1024**3})
    assert gpu == {"CPU": 1.0, "GPU": 1.0, "target:cuda": 1.0, "memory": 2 * 1024**3}
    cpu_node = {"Alive": True, "NodeManagerAddress": "10.0.0.1",
                "Resources": {"CPU": 2.0, "memory": 8 * 1024**3, "node:10.0.0.1": 1.0}}
    gpu_node = {"Alive": True, "NodeManagerAddress": "10.0.0.2",
                "Resources": {"CPU": 8.0, "GPU": 1.0, "target:cuda": 1.0, "memory": 64 * 1024**3}}
    assert unschedulable(ray_needs({}), [cpu_node]) is None
    assert unschedulable(gpu, [cpu_node, gpu_node]) is None
    reason = unschedulable(gpu, [cpu_node, {**gpu_node, "Alive": False}])
    assert reason is not None and "\n" not in reason
    assert "GPU=1" in reason and "target:cuda=1" in reason and "10.0.0.1: CPU=2, memory=8.0GiB" in reason
    assert "10.0.0.2" not in reason  # a dead node offers nothing
    # needs that only the sum of two nodes meets are still unschedulable: one task runs on one node
    assert unschedulable(ray_needs({"num_cpus": 3}), [cpu_node, {**cpu_node, "NodeManagerAddress": "x"}])
