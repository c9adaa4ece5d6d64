"""The model lifecycle against a real `mlflow server` on 127.0.0.1: write-back on publish, `kiln watch`,
the webhook receiver (and MLflow calling it), `kiln ci`, and a registry outage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from conftest import RECIPES, ROOT, MlflowServer, base_env, derive_recipe, free_port, kiln, register_examples
from pipeline.webhook import signature

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def served(mlflow_server, tmp_path_factory):
    register_examples(mlflow_server, tmp_path_factory.mktemp("register-home"))
    return mlflow_server


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _new_version(uri: str, name: str, alias: str | None = None) -> str:
    """A new version of `name` made from the registered digits-cnn's logged model (no training needed)."""
    import mlflow

    client = _client(uri)
    source = client.get_model_version_by_alias("digits-cnn", "champion")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    version = mlflow.register_model(source.source, name).version
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return str(version)


def _recipe(tmp: Path, name: str, uri: str, **changes) -> Path:
    return derive_recipe(tmp / f"{name}.yaml", RECIPES / "digits-cnn.yaml", {
        "name": name, "source": {"uri": uri}, "serving": {"targets": []},
        "validation": {"latency": {"batch_sizes": [1], "iterations": 100, "target_ci": None}}, **changes,
    })


def test_write_back_moves_the_alias_only_when_gates_pass(served, tmp_path):
    artifacts = str(tmp_path / "a")
    target = "wb-cnn-onnx"
    good = _recipe(tmp_path, "wb-good", "models:/digits-cnn@champion",
                   publish={"write_back": {"enabled": True, "model_name": target, "alias": "optimized"}})
    result = kiln("run", str(good), "--tracking-uri", served, "--artifacts", artifacts)
    assert result.returncode == 0, result.stderr
    client = _client(served)
    version = client.get_model_version_by_alias(target, "optimized")
    assert version.tags["kiln.source_uri"] == "models:/digits-cnn@champion"
    assert version.tags["kiln.gates"] == "passed" and len(version.tags["kiln.bundle_sha256"]) == 64
    manifest = json.loads((tmp_path / "a/bundles/wb-good" / f"v{version.tags['kiln.source_version']}/manifest.json").read_text())
    assert version.tags["kiln.recipe_sha256"] == manifest["recipe"]["sha256"]
    run = client.get_run(version.run_id)
    assert run.data.metrics["speedup.b1"] > 0 and "cosine.logits" in run.data.metrics
    assert run.data.tags["kiln.source_run_id"] == manifest["source"]["run_id"]
    import mlflow.onnx

    mlflow.set_tracking_uri(served)
    mlflow.set_registry_uri(served)
    (tmp_path / "dl").mkdir()
    assert mlflow.onnx.load_model(f"models:/{target}@optimized", dst_path=str(tmp_path / "dl")).graph.input[0].name == "pixels"
    # a re-run registers nothing new
    assert kiln("run", str(good), "--tracking-uri", served, "--artifacts", artifacts).returncode == 0
    assert len(client.search_model_versions(f"name = '{target}'")) == 1

    strict = _recipe(tmp_path, "wb-strict", "models:/digits-cnn@champion",
                     gates={"parity": {"default": {"atol": 0, "rtol": 0}}},
                     publish={"write_back": {"enabled": True, "model_name": target, "alias": "optimized"}})
    result = kiln("run", str(strict), "--tracking-uri", served, "--artifacts", artifacts)
    assert result.returncode == 1
    assert "recorded on run" in result.stderr
    assert client.get_model_version_by_alias(target, "optimized").version == version.version
    assert len(client.search_model_versions(f"name = '{target}'")) == 1
    experiment = client.get_experiment_by_name("kiln-builds")
    failed = client.search_runs([experiment.experiment_id], "tags.`kiln.recipe` = 'wb-strict'")
    assert failed and failed[0].info.status == "FAILED"
    assert failed[0].data.tags["kiln.status"] == "gate_failed" and "atol 0" in failed[0].data.tags["kiln.reason"]
    logged = [a.path for a in client.list_artifacts(failed[0].info.run_id, "kiln/gate")]
    assert "kiln/gate/verdicts.json" in logged, logged  # the failing gate's verdicts, with the run that failed


def _watch_once(recipes: Path, uri: str, artifacts: str):
    return kiln("watch", "--once", str(recipes), "--tracking-uri", uri, "--artifacts", artifacts)


def _built(result) -> list[str]:
    return [line.split("building ", 1)[1] for line in result.stderr.splitlines() if "kiln watch: building" in line]


def test_watch_builds_each_new_version_once_and_follows_alias_moves(served, tmp_path):
    name = "watched-cnn"
    _new_version(served, name, alias="live")
    folder = tmp_path / "recipes"
    folder.mkdir()
    _recipe(folder, "follows-latest", f"models:/{name}/latest")
    _recipe(folder, "follows-alias", f"models:/{name}@live")
    artifacts = str(tmp_path / "a")
    first = _watch_once(folder, served, artifacts)
    assert first.returncode == 0, first.stderr
    assert sorted(_built(first)) == [f"follows-alias for models:/{name}@live -> version 1",
                                     f"follows-latest for models:/{name}/latest -> version 1"]
    again = _watch_once(folder, served, artifacts)  # a restarted watcher remembers
    assert again.returncode == 0 and _built(again) == []

    _new_version(served, name)  # version 2: only the recipe on /latest follows it
    third = _watch_once(folder, served, artifacts)
    assert _built(third) == [f"follows-latest for models:/{name}/latest -> version 2"]
    _client(served).set_registered_model_alias(name, "live", "2")  # alias move
    fourth = _watch_once(folder, served, artifacts)
    assert _built(fourth) == [f"follows-alias for models:/{name}@live -> version 2"]
    state = json.loads((tmp_path / "a/watch/state.json").read_text())["handled"]
    assert len(state) == 4 and all(v["status"] == "passed" for v in state.values())


def _post(url: str, body: str, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Receiver:
    def __init__(self, recipes: Path, uri: str, artifacts: str, secret: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = open(Path(artifacts).parent / "webhook.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "webhook-server", str(recipes), "--port", str(self.port),
             "--tracking-uri", uri, "--artifacts", artifacts],
            cwd=ROOT, env=base_env(KILN_WEBHOOK_SECRET=secret), stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "listening on" in Path(self.log.name).read_text():
                return
            assert self.process.poll() is None, Path(self.log.name).read_text()
            time.sleep(0.2)
        raise AssertionError("webhook server did not start")

    def stop(self):
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=20)
        self.log.close()


def _signed(secret: str, body: str, delivery: str, stamp: int | None = None) -> dict:
    stamp = str(stamp if stamp is not None else int(time.time()))
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": signature(secret, delivery, stamp, body)}


def test_webhook_receiver_verifies_signatures_and_refuses_replays(served, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    _recipe(folder, "hooked", "models:/not-registered-yet/latest")
    receiver = Receiver(folder, served, str(tmp_path / "a"), secret="s3cret")
    try:
        body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "someone-else", "version": "1"}})
        assert _post(receiver.url, body, {})[0] == 401  # unsigned
        assert _post(receiver.url, body, _signed("wrong", body, "d-1"))[0] == 401
        assert _post(receiver.url, body, _signed("s3cret", body, "d-2", stamp=int(time.time()) - 3600))[0] == 409
        status, answer = _post(receiver.url, body, _signed("s3cret", body, "d-3"))
        assert status == 200 and "ignored" in answer["message"]
        assert _post(receiver.url, body, _signed("s3cret", body, "d-3"))[0] == 409  # the same delivery again
        tampered = body.replace("someone-else", "not-registered-yet")
        assert _post(receiver.url, tampered, _signed("s3cret", body, "d-4"))[0] == 401
    finally:
        receiver.stop()


def test_mlflow_calls_the_receiver_and_the_new_version_is_built(served, tmp_path):
    name = "hooked-cnn"
    folder = tmp_path / "recipes"
    folder.mkdir()
    _recipe(folder, "hooked", f"models:/{name}/latest")
    artifacts = tmp_path / "a"
    receiver = Receiver(folder, served, str(artifacts), secret="hook-secret")
    client = _client(served)
    hook = client.create_webhook(name="kiln-test", url=receiver.url, events=["model_version.created"],
                                 secret="hook-secret")
    try:
        time.sleep(2)  # past the server's webhook cache TTL (1 s in the test server)
        version = _new_version(served, name)
        state = artifacts / "watch" / "state.json"
        deadline = time.monotonic() + 480  # the build itself runs in the receiver; slow when the machine is busy
        while time.monotonic() < deadline:
            if state.exists() and f"hooked|{name}|{version}" in json.loads(state.read_text())["handled"]:
                break
            time.sleep(1)
        log = Path(receiver.log.name).read_text()
        assert state.exists(), log
        handled = json.loads(state.read_text())["handled"][f"hooked|{name}|{version}"]
        assert handled["status"] == "passed", log
        assert "queued a build for hooked-cnn (model_version.created)" in log
    finally:
        client.delete_webhook(hook.webhook_id)
        receiver.stop()


def test_ci_mode_writes_junit_and_markdown(served, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    _recipe(folder, "ci-good", "models:/digits-cnn@champion")
    _recipe(folder, "ci-strict", "models:/digits-cnn@champion", gates={"parity": {"default": {"atol": 0, "rtol": 0}}})
    _recipe(folder, "ci-other", "models:/bert-encoder@champion")
    junit, summary = tmp_path / "junit.xml", tmp_path / "summary.md"
    result = kiln("ci", str(folder), "--model", "digits-cnn", "--junit", str(junit), "--summary", str(summary),
                  "--tracking-uri", served, "--artifacts", str(tmp_path / "a"))
    assert result.returncode == 1, result.stderr
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "1"  # ci-other does not follow digits-cnn
    names = {case.get("name").split(" ")[0]: case for case in suite.iter("testcase")}
    assert names["ci-strict"].find("failure") is not None and names["ci-good"].find("failure") is None
    text = summary.read_text()
    assert "| ci-good |" in text and "❌ gate failed" in text


def test_registry_outage_gives_a_clear_error_and_recovers(served, mlflow_server_process, tmp_path):
    """The write-back registry goes away: a one-line error, nothing registered; back up: completed once."""
    outage = MlflowServer(tmp_path / "wb-server").start()
    recipe = _recipe(tmp_path, "wb-outage", "models:/digits-cnn@champion",
                     publish={"write_back": {"enabled": True, "model_name": "outage-onnx", "tracking_uri": outage.uri}})
    artifacts = str(tmp_path / "a")
    try:
        outage.stop()
        result = kiln("run", str(recipe), "--tracking-uri", served, "--artifacts", artifacts)
        assert result.returncode == 2, result.stderr
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("kiln:")]
        assert f"publish.write_back: registry {outage.uri}" in line and "no alias was moved" in line
        outage.start()
        assert _client(outage.uri).search_model_versions("name = 'outage-onnx'") == []
        again = kiln("run", str(recipe), "--tracking-uri", served, "--artifacts", artifacts)
        assert again.returncode == 0, again.stderr
        versions = _client(outage.uri).search_model_versions("name = 'outage-onnx'")
        assert len(versions) == 1
        assert _client(outage.uri).get_model_version_by_alias("outage-onnx", "optimized").version == versions[0].version
    finally:
        outage.stop()
    # The watcher's registry goes away (a second server on the session registry's database, stopped): a clear
    # error, nothing handled; when it is back, the next poll builds.
    second = MlflowServer(mlflow_server_process.home)
    folder = tmp_path / "watched"
    folder.mkdir()
    _recipe(folder, "w", "models:/digits-cnn@champion")
    failed = _watch_once(folder, second.uri, str(tmp_path / "b"))
    assert failed.returncode == 2 and f"tracking URI {second.uri}: unreachable" in failed.stderr
    assert not (tmp_path / "b/watch/state.json").exists()
    second.start()
    try:
        recovered = _watch_once(folder, second.uri, str(tmp_path / "b"))
        assert recovered.returncode == 0 and len(_built(recovered)) == 1, recovered.stderr
    finally:
        second.stop()
