"""Shared fixtures. Integration tests drive the real `kiln` CLI in subprocesses against real MLflow
registries: the sqlite default (registered once per session) and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

QUIET = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_OFFLINE": "1",
}


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY", "KILN_"))}
    env.update(QUIET)
    env.update(extra)
    return env


def kiln(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path = ROOT):
    """Run the real CLI; returns CompletedProcess with text stdout/stderr."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def process_alive(pid: int) -> bool:
    """Whether pid runs (Linux /proc); a zombie has exited, only its parent (init, here) can still reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def run_json(*args: str, **kwargs):
    result = kiln("run", "--json", *args, **kwargs)
    summary = json.loads(result.stdout) if result.stdout.strip().startswith("{") else None
    return result, summary


def steps_by_status(summary: dict, status: str) -> list[str]:
    return [s["step"] for r in summary["recipes"] for s in r["steps"] if s["status"] == status]


def register_examples(tracking_uri: str, artifacts: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.register", "--tracking-uri", tracking_uri, "--artifacts", str(artifacts)],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def run_fixture_script(script: str, registry: str) -> str:
    """Register extra test models with a script from tests/fixtures; returns the registry URI."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / script), registry],
                          cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return registry


@pytest.fixture(autouse=True)
def _no_leaked_mlflow_uri():
    """mlflow.set_tracking_uri/set_registry_uri in a test also set process environment variables that every
    later subprocess would inherit (base_env drops them too); undo them after each test."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"))}
    yield
    for key in [k for k in os.environ if k.startswith(("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"))]:
        if key not in saved:
            del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> str:
    """A sqlite MLflow registry (kiln's embedded default kind) with the example models as @champion."""
    home = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    register_examples(uri, home)
    return uri


def write_recipe(path: Path, source: Path, replace: dict[str, str]) -> Path:
    text = source.read_text()
    for old, new in replace.items():
        assert old in text, f"{old!r} not in {source}"
        text = text.replace(old, new)
    path.write_text(text)
    return path


def derive_recipe(path: Path, source: Path, changes: dict) -> Path:
    """A copy of a recipe with `changes` deep-merged into it (mappings merge, everything else replaces)."""
    import yaml

    def merge(base: dict, extra: dict) -> dict:
        out = dict(base)
        for key, value in extra.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    path.write_text(yaml.safe_dump(merge(yaml.safe_load(source.read_text()), changes), sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, served artifacts) in its own process group.
    Webhook delivery to http on loopback is allowed, so it can call kiln's receiver."""

    def __init__(self, home: Path, port: int | None = None):
        self.home = home
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "server.log", "a")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
                "--artifacts-destination", str(self.home / "artifacts"),
                "--workers", "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # The server caches each event's webhook list for 60 s by default: a webhook created right after
            # an event of its kind would miss the next deliveries. One second keeps tests prompt.
            env=base_env(MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https", MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
                         MLFLOW_WEBHOOK_CACHE_TTL="1"),
            start_new_session=True,  # its gunicorn/uvicorn workers go down with it
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {(self.home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 for the whole session, stopped by its PID."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process) -> str:
    return mlflow_server_process.uri


@pytest.fixture(scope="session")
def onnx_registry_session(tmp_path_factory) -> str:
    """A sqlite registry with the ONNX-source test models (tests/fixtures/register_onnx.py), once per session:
    `digits-onnx-inline` takes pixels float32 [N, 64]; `digits-onnx`'s run logs validation/digits-test.npz."""
    home = tmp_path_factory.mktemp("onnx-registry-session")
    return run_fixture_script("register_onnx.py", f"sqlite:///{home / 'mlflow.db'}")


def cli_invoke(*args: str):
    """Run the real `kiln` command line in this process (click's CliRunner on pipeline.cli): no interpreter start,
    for tests that feed it hundreds of inputs. Returns (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):  # escaped even _guard
        import traceback

        return 99, result.stdout, "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.stdout, result.stderr


def error_lines(text: str) -> list[str]:
    """kiln's error lines: what a bad input must produce exactly one of."""
    return [line for line in text.splitlines() if line.startswith("kiln:")]


# --- a model too large for one protobuf, in miniature ----------------------------------------------------------

EXTERNAL_DATA_BYTES = 4096  # KILN_EXTERNAL_DATA_BYTES for the external-data build: digits-cnn's weights exceed it


@pytest.fixture(scope="session")
def external_bundle(registry, tmp_path_factory) -> dict:
    """digits-cnn built by the real `kiln run` with the external-data threshold lowered, so every ONNX step
    writes model.onnx + model.onnx.data as it would for a model over 2 GiB; served by Triton and TorchServe
    (free ports), with an INT8 variant. Shared by tests/test_external_data.py and both server tests."""
    tmp = tmp_path_factory.mktemp("external-data")
    ports = {"inference": free_port(), "management": free_port(), "metrics": free_port()}
    recipe = derive_recipe(tmp / "digits-ext.yaml", RECIPES / "digits-cnn.yaml", {
        "name": "digits-ext",
        "validation": {"latency": {"batch_sizes": [1], "iterations": 100, "time_budget_s": 2}},
        "variants": [{"name": "int8", "kind": "int8-dynamic", "gates": {"default": {"min_cosine": 0.99}}}],
        "serving": {"targets": ["triton", "torchserve"], "triton": {"max_batch_size": 32},
                    "torchserve": {f"{name}_port": port for name, port in ports.items()}},
    })
    env = base_env(KILN_EXTERNAL_DATA_BYTES=str(EXTERNAL_DATA_BYTES))
    started = time.monotonic()
    result, summary = run_json(str(recipe), "--tracking-uri", registry, "--artifacts", str(tmp / "artifacts"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"bundle": Path(summary["recipes"][0]["bundle"]), "summary": summary, "ports": ports, "tmp": tmp,
            "artifacts": tmp / "artifacts", "seconds": time.monotonic() - started}
