"""`kiln webhook-server`: receive MLflow model-registry webhooks, verify them, and queue builds.

MLflow signs a delivery as "v1," + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}")) in
X-MLflow-Signature, with X-MLflow-Delivery-Id and X-MLflow-Timestamp. A delivery is refused when unsigned or
wrongly signed (401), older than the tolerance, or already seen (409: a replay). Accepted events for models a
recipe follows queue a build (202); others are acknowledged and ignored (200). Builds run one at a time on a
worker thread, through the same code as `kiln watch` (state, locks, cache), so a version is built once.

Built to face hostile clients: one event loop serves every connection (no thread per connection), with a cap on
open connections (503 beyond it), a deadline for the headers and one for the body, headers limited in size, and
the body's declared length checked (400 when not a number, 413 when over 1 MiB, 503 while too many bodies are in
flight) before a byte of it is read. The signature headers are checked first: missing or malformed ones, stale
timestamps and known delivery ids are refused before the body is read (the HMAC itself needs the body). Delivery
ids are kept in <artifacts>/webhook/deliveries.json (atomic writes, pruned past the tolerance window), so a replay
is refused after a restart too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.errors import BadInput
from pipeline.store import write_json_atomic

SIGNATURE = "X-MLflow-Signature"
TIMESTAMP = "X-MLflow-Timestamp"
DELIVERY = "X-MLflow-Delivery-Id"
EVENTS = {("model_version", "created"), ("model_version_alias", "created")}
REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
           413: "Payload Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}


@dataclass(frozen=True)
class Limits:
    max_connections: int = 512  # open at once; beyond, answered 503 and closed
    header_bytes: int = 16 << 10  # request line and headers
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_body: int = 1 << 20
    bodies_in_flight: int = 16 << 20  # declared bytes being read at once, all connections together


def signature(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Replays:
    """Delivery ids seen, with their timestamps, persisted so that a restart does not forget them. An id is
    needed only while its timestamp is within the tolerance: older deliveries are refused as stale anyway."""

    def __init__(self, path: Path | None, tolerance_s: int):
        self.path, self.tolerance_s = path, tolerance_s
        self.seen: dict[str, int] = {}
        try:
            loaded = json.loads(path.read_text()) if path else {}
            self.seen = {str(k): int(v) for k, v in loaded.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self.seen = {}  # no file yet, or unreadable: start empty (stale deliveries are refused by age)

    def __contains__(self, delivery: str) -> bool:
        return delivery in self.seen

    def add(self, delivery: str, stamp: int) -> bool:
        """Remember an authentic delivery; False when it was already seen (a concurrent replay)."""
        if delivery in self.seen:
            return False
        cutoff = time.time() - self.tolerance_s - 60  # a minute of slack for clock differences
        self.seen = {k: v for k, v in self.seen.items() if v >= cutoff}
        self.seen[delivery] = stamp
        if self.path:
            write_json_atomic(self.path, self.seen)
        return True


class Verifier:
    def __init__(self, secret: str, tolerance_s: int = 300, replays: Path | None = None):
        if not secret:
            raise ValueError("a webhook secret is required")
        self.secret = secret
        self.tolerance_s = tolerance_s
        self.replays = Replays(replays, tolerance_s)

    def precheck(self, headers: dict[str, str], now: float | None = None) -> tuple[int, str]:
        """What can be refused before reading the body: (200, "ok") or the refusal."""
        given, delivery, stamp = (headers.get(h.lower()) for h in (SIGNATURE, DELIVERY, TIMESTAMP))
        if not (given and delivery and stamp):
            return 401, "unsigned delivery (X-MLflow-Signature, -Delivery-Id and -Timestamp are required)"
        try:
            well_formed = given.startswith("v1,") and len(base64.b64decode(given[3:], validate=True)) == 32
        except (binascii.Error, ValueError):
            well_formed = False
        if not well_formed:
            return 401, "malformed signature (expected v1,<base64 HMAC-SHA256>)"
        if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
            return 401, "bad timestamp"
        age = abs((now or time.time()) - int(stamp))
        if age > self.tolerance_s:
            return 409, f"stale delivery ({age:.0f}s old; replay protection allows {self.tolerance_s}s)"
        if len(delivery) > 200 or not delivery.isprintable():
            return 401, "malformed delivery id"
        if delivery in self.replays:
            return 409, f"replayed delivery {delivery}"
        return 200, "ok"

    def check(self, headers: dict[str, str], body: str, now: float | None = None) -> tuple[int, str]:
        """(HTTP status, reason): 200 when the delivery is authentic and new (and then it is remembered)."""
        status, reason = self.precheck(headers, now)
        if status != 200:
            return status, reason
        delivery, stamp = headers[DELIVERY.lower()], headers[TIMESTAMP.lower()]
        if not hmac.compare_digest(headers[SIGNATURE.lower()], signature(self.secret, delivery, stamp, body)):
            return 401, "bad signature"
        if not self.replays.add(delivery, int(stamp)):
            return 409, f"replayed delivery {delivery}"
        return 200, "ok"


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _parse_head(raw: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, path, headers with lower-case names) of a request head; Refused(400) when it is not HTTP/1.x."""
    try:
        lines = raw.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise Refused(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise Refused(400, "only HTTP/1.x is spoken here")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise Refused(400, "malformed header line")
        key = name.lower()
        if key in headers and key == "content-length" and headers[key] != value.strip():
            raise Refused(400, "conflicting Content-Length headers")
        headers[key] = value.strip()
    return method, target, headers


def _body_length(headers: dict[str, str], limits: Limits) -> int:
    if "transfer-encoding" in headers:
        raise Refused(411, "chunked bodies are not accepted; send Content-Length")
    declared = headers.get("content-length")
    if declared is None:
        raise Refused(411, "Content-Length is required")
    if not (declared.isascii() and declared.isdigit()) or len(declared) > 12:
        raise Refused(400, f"Content-Length {declared[:20]!r} is not a byte count")
    if int(declared) > limits.max_body:
        raise Refused(413, f"payload too large (at most {limits.max_body} bytes)")
    return int(declared)


class Receiver:
    """The HTTP side: one asyncio loop, every limit in `limits`; accepted events go to `jobs` for the builder."""

    def __init__(self, verifier: Verifier, follows: Callable[[str], bool], jobs: "queue.Queue[dict]",
                 say: Callable[[str], None] = print, limits: Limits = Limits()):
        self.verifier, self.follows, self.jobs, self.say, self.limits = verifier, follows, jobs, say, limits
        self.open = 0  # connections being served
        self.in_flight = 0  # declared body bytes being read

    async def serve(self, host: str, port: int, ready: Callable[[int], None]) -> None:
        try:
            server = await asyncio.start_server(self._connection, host, port, limit=self.limits.header_bytes)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's message repeats the address
            raise BadInput(f"--port {port}: cannot listen on {host}:{port} ({why})") from None
        ready(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= self.limits.max_connections:
            await self._answer(writer, 503, "too many connections; retry later")
            return
        self.open += 1
        try:
            status, message = await self._request(reader)
        except Refused as refused:
            status, message = refused.status, refused.message
            if status in (401, 409):
                self.say(f"kiln webhook: refused ({status}): {message}")
        except (asyncio.IncompleteReadError, ConnectionError):
            status = 0  # the client went away: nobody to answer
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the receiver
            self.say(f"kiln webhook: internal error: {type(exc).__name__}: {exc}")
            status, message = 500, "internal error"
        finally:
            self.open -= 1
        if status:
            await self._answer(writer, status, message)
        else:
            writer.close()

    async def _request(self, reader: asyncio.StreamReader) -> tuple[int, str]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.limits.header_timeout_s)
        except asyncio.TimeoutError:
            raise Refused(408, "request headers not received in time") from None
        except asyncio.LimitOverrunError:
            raise Refused(431, f"request headers over {self.limits.header_bytes} bytes") from None
        method, _, headers = _parse_head(head[:-4])
        if method != "POST":
            raise Refused(405, "only POST is accepted")
        length = _body_length(headers, self.limits)
        status, reason = self.verifier.precheck(headers)  # before a byte of the body is read
        if status != 200:
            raise Refused(status, reason)
        if self.in_flight + length > self.limits.bodies_in_flight:
            raise Refused(503, "too many deliveries in flight; retry later")
        self.in_flight += length
        try:
            body = await asyncio.wait_for(reader.readexactly(length), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refused(408, "body not received in time") from None
        finally:
            self.in_flight -= length
        text = body.decode("utf-8", errors="replace")
        status, reason = self.verifier.check(headers, text)
        if status != 200:
            raise Refused(status, reason)
        return self._event(text)

    def _event(self, body: str) -> tuple[int, str]:
        try:
            event = json.loads(body)
            kind = (event["entity"], event["action"])
            name = event["data"]["name"]
        except (ValueError, KeyError, TypeError):
            return 400, "not an MLflow webhook payload"
        if kind not in EVENTS or not isinstance(name, str) or not self.follows(name):
            return 200, f"ignored: no recipe follows {kind[0]}.{kind[1]} for {name!r}"
        self.jobs.put({"model": name, "event": f"{kind[0]}.{kind[1]}", "data": event["data"]})
        self.say(f"kiln webhook: queued a build for {name} ({kind[0]}.{kind[1]})")
        return 202, f"build queued for {name}"

    async def _answer(self, writer: asyncio.StreamWriter, status: int, message: str) -> None:
        body = json.dumps({"status": status, "message": message}).encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(head + body)
            await asyncio.wait_for(writer.drain(), self.limits.body_timeout_s)
        except (asyncio.TimeoutError, ConnectionError):
            pass  # a client that does not read its answer gets none
        finally:
            writer.close()
