"""The webhook receiver against hostile clients, as a real process on 127.0.0.1: 300 slow connections (150 that
never finish their headers, 150 that declare a body and never send it) held open while 1,000 bad requests
arrive; threads and memory stay bounded, every bad request is answered, a valid signed delivery still builds
exactly once, and a replay is refused, also after a restart. A busy port is exit 2 with one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from conftest import RECIPES, ROOT, base_env, derive_recipe, free_port, kiln
from pipeline.webhook import signature

SECRET = "hardening-secret"


class Server:
    def __init__(self, recipes: Path, registry: str, artifacts: Path, port: int, log: Path):
        self.port, self.log = port, log
        start = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
        with open(log, "a") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "webhook-server", str(recipes), "--host", "127.0.0.1",
                 "--port", str(port), "--tracking-uri", registry, "--artifacts", str(artifacts)],
                cwd=ROOT, env=base_env(KILN_WEBHOOK_SECRET=SECRET), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 90
        while f":{port}/" not in log.read_text()[start:]:
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

    def threads_and_rss(self) -> tuple[int, int]:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines())
        return int(status["Threads"]), int(status["VmRSS"].split()[0]) // 1024  # MiB

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.settimeout(15)
    return sock


def _ask(port: int, raw: bytes) -> int:
    """Send one raw request; the status code of the answer (0: closed without one)."""
    with _connect(port) as sock:
        sock.sendall(raw)
        return _answer_of(sock)


def _answer_of(sock: socket.socket) -> int:
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass  # refused before its body was read: the receiver closes with the body unread (a reset after the answer)
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _head_only(delivery: str) -> bytes:
    """Headers that pass every check made before the body (well-formed signature, fresh, new id) and declare
    a body that never comes."""
    return _post("", _signed("", delivery)).replace(b"Content-Length: 0", b"Content-Length: 100")


def _post(body: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST / HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body.encode())}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def _signed(body: str, delivery: str, stamp: int | None = None, secret: str = SECRET) -> dict[str, str]:
    stamp_text = str(stamp if stamp is not None else int(time.time()))
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp_text,
            "X-MLflow-Signature": signature(secret, delivery, stamp_text, body)}


def _bad_requests(count: int) -> tuple[list[bytes], Counter]:
    """`count` bad requests of 12 kinds, and the answers they should get."""
    body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "digits-cnn"}})
    fresh = _signed(body, "x")
    kinds = [
        b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"garbage\r\n\r\n",
        b"POST / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        _post(body, {}),  # unsigned
        _post(body, {**fresh, "X-MLflow-Signature": "v1,not-base64!"}),
        _post(body, _signed(body, "y", secret="wrong")),
        _post(body, _signed(body, "z", stamp=int(time.time()) - 3600)),
    ]
    expected = [400, 400, 413, 411, 411, 405, 400, 431, 401, 401, 401, 409]
    return [kinds[i % len(kinds)] for i in range(count)], Counter(expected[i % len(kinds)] for i in range(count))


@pytest.mark.slow
def test_receiver_survives_slow_and_bad_clients_and_builds_once(registry, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    derive_recipe(folder / "hooked.yaml", RECIPES / "digits-cnn.yaml", {
        "name": "hooked", "serving": {"targets": []},
        "validation": {"latency": {"batch_sizes": [1], "iterations": 100, "target_ci": None}}})
    artifacts, log, port = tmp_path / "a", tmp_path / "webhook.log", free_port()
    server = Server(folder, registry, artifacts, port, log)
    slow: list[socket.socket] = []
    try:
        threads_before, rss_before = server.threads_and_rss()
        for i in range(300):
            sock = _connect(port)
            sock.sendall(b"POST / HTTP/1.1\r\nContent-Len" if i % 2 else _head_only(f"slow-{i}"))
            slow.append(sock)
        requests, expected = _bad_requests(1000)
        answers = Counter(_ask(port, raw) for raw in requests)
        threads_during, rss_during = server.threads_and_rss()
        print(f"\nthreads {threads_before} -> {threads_during}; RSS {rss_before} -> {rss_during} MiB; "
              f"answers {dict(sorted(answers.items()))}")
        assert answers == expected
        assert threads_during <= threads_before + 1, (threads_before, threads_during)
        assert rss_during - rss_before < 64, (rss_before, rss_during)

        body = json.dumps({"entity": "model_version", "action": "created",
                           "data": {"name": "digits-cnn", "version": "1"}})
        valid = _signed(body, str(uuid.uuid4()))
        assert _ask(port, _post(body, valid)) == 202  # answered at once, slow clients still held
        assert _ask(port, _post(body, valid)) == 409  # the same delivery again
        timed_out = Counter(_answer_of(sock) for sock in slow)  # the receiver's deadlines close them
        assert set(timed_out) <= {408}, timed_out

        state = artifacts / "watch" / "state.json"
        deadline = time.monotonic() + 300
        while not (state.exists() and "hooked|digits-cnn|1" in json.loads(state.read_text())["handled"]):
            assert time.monotonic() < deadline and server.process.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        assert json.loads(state.read_text())["handled"]["hooked|digits-cnn|1"]["status"] == "passed"
    finally:
        for sock in slow:
            sock.close()
        server.stop()

    server = Server(folder, registry, artifacts, port, log)  # a restart remembers the deliveries it accepted
    try:
        assert _ask(port, _post(body, valid)) == 409
        assert _ask(port, _post(body, _signed(body, str(uuid.uuid4())))) == 202  # new event, same version
        deadline = time.monotonic() + 120
        while "digits-cnn: nothing new built" not in log.read_text():
            assert time.monotonic() < deadline and server.process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        server.stop()
    assert log.read_text().count("kiln watch: building hooked") == 1, log.read_text()[-3000:]



@pytest.mark.slow
def test_busy_port_is_one_line_and_exit_2(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        busy = kiln("webhook-server", str(RECIPES / "digits-cnn.yaml"), "--port", str(port),
                    "--artifacts", str(tmp_path / "a"), env=base_env(KILN_WEBHOOK_SECRET=SECRET), timeout=120)
    assert busy.returncode == 2, busy.stderr
    assert busy.stderr.strip().splitlines() == [f"kiln: error: --port {port}: cannot listen on 127.0.0.1:{port} "
                                                "(Address already in use)"]


def test_headers_are_judged_before_the_body_and_replays_survive_a_restart(tmp_path):
    from pipeline.webhook import Limits, Refused, Verifier, _body_length, _parse_head

    for declared, status in (("abc", 400), ("-5", 400), ("1e3", 400), ("²", 400), (str(2 << 20), 413)):
        with pytest.raises(Refused) as refused:
            _body_length({"content-length": declared}, Limits())
        assert refused.value.status == status, declared
    with pytest.raises(Refused, match="conflicting"):
        _parse_head(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2")
    _, _, headers = _parse_head(b"POST / HTTP/1.1\r\nX-MLflow-Timestamp: 5\r\ncontent-length: 3")
    assert headers == {"x-mlflow-timestamp": "5", "content-length": "3"}

    store = tmp_path / "webhook" / "deliveries.json"
    verifier = Verifier(SECRET, replays=store)
    body = '{"entity": "model_version"}'
    signed = {k.lower(): v for k, v in _signed(body, "d-1").items()}
    assert verifier.precheck({**signed, "x-mlflow-signature": "v1,abc"})[0] == 401  # malformed, no body needed
    assert verifier.check(signed, body) == (200, "ok")
    assert verifier.check(signed, body)[0] == 409
    restarted = Verifier(SECRET, replays=store)
    assert restarted.precheck(signed) == (409, "replayed delivery d-1")  # refused before reading the body
    old = {k.lower(): v for k, v in _signed(body, "d-old", stamp=int(time.time()) - 250).items()}
    assert restarted.check(old, body) == (200, "ok")
    restarted.tolerance_s = restarted.replays.tolerance_s = 10  # d-old is now past the window: pruned on write
    assert restarted.check({k.lower(): v for k, v in _signed(body, "d-2").items()}, body) == (200, "ok")
    assert set(json.loads(store.read_text())) == {"d-1", "d-2"}
