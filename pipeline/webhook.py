"""`kiln webhook-server`: receive MLflow model-registry webhooks, verify them, and queue builds.

MLflow signs a delivery as "v1," + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}")) in
X-MLflow-Signature, with X-MLflow-Delivery-Id and X-MLflow-Timestamp. A delivery is refused when unsigned or
wrongly signed (401), older than the tolerance, or already seen (409: a replay). Accepted events for models a
recipe follows queue a build (202); others are acknowledged and ignored (200). Builds run one at a time on a
worker thread, through the same code as `kiln watch` (state, locks, cache), so a version is built once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

SIGNATURE = "X-MLflow-Signature"
TIMESTAMP = "X-MLflow-Timestamp"
DELIVERY = "X-MLflow-Delivery-Id"
EVENTS = {("model_version", "created"), ("model_version_alias", "created")}


def signature(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Verifier:
    def __init__(self, secret: str, tolerance_s: int = 300, remember: int = 10000):
        if not secret:
            raise ValueError("a webhook secret is required")
        self.secret = secret
        self.tolerance_s = tolerance_s
        self.seen: OrderedDict[str, float] = OrderedDict()
        self.remember = remember
        self.lock = threading.Lock()

    def check(self, headers, body: str, now: float | None = None) -> tuple[int, str]:
        """(HTTP status, reason): 200 when the delivery is authentic and new."""
        given, delivery, stamp = headers.get(SIGNATURE), headers.get(DELIVERY), headers.get(TIMESTAMP)
        if not (given and delivery and stamp):
            return 401, "unsigned delivery (X-MLflow-Signature, -Delivery-Id and -Timestamp are required)"
        if not hmac.compare_digest(given, signature(self.secret, delivery, stamp, body)):
            return 401, "bad signature"
        try:
            age = abs((now or time.time()) - int(stamp))
        except ValueError:
            return 401, "bad timestamp"
        if age > self.tolerance_s:
            return 409, f"stale delivery ({age:.0f}s old; replay protection allows {self.tolerance_s}s)"
        with self.lock:
            if delivery in self.seen:
                return 409, f"replayed delivery {delivery}"
            self.seen[delivery] = time.time()
            while len(self.seen) > self.remember:
                self.seen.popitem(last=False)
        return 200, "ok"


def make_server(host: str, port: int, verifier: Verifier, follows: Callable[[str], bool],
                jobs: "queue.Queue[dict]", say: Callable[[str], None] = print) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, message: str) -> None:
            body = json.dumps({"status": status, "message": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            if length > 1 << 20:
                return self._answer(413, "payload too large")
            body = self.rfile.read(length).decode("utf-8", errors="replace")
            status, reason = verifier.check(self.headers, body)
            if status != 200:
                say(f"kiln webhook: refused ({status}): {reason}")
                return self._answer(status, reason)
            try:
                event = json.loads(body)
                kind = (event["entity"], event["action"])
                name = event["data"]["name"]
            except (ValueError, KeyError, TypeError):
                return self._answer(400, "not an MLflow webhook payload")
            if kind not in EVENTS or not follows(name):
                return self._answer(200, f"ignored: no recipe follows {kind[0]}.{kind[1]} for {name!r}")
            jobs.put({"model": name, "event": f"{kind[0]}.{kind[1]}", "data": event["data"]})
            say(f"kiln webhook: queued a build for {name} ({kind[0]}.{kind[1]})")
            return self._answer(202, f"build queued for {name}")

        def log_message(self, *args) -> None:  # quiet: the receiver reports what it does itself
            pass

    return ThreadingHTTPServer((host, port), Handler)
