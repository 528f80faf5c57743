"""A webhook receiver as a customer would write one: a real HTTP server on loopback, in a thread.

It verifies every request the Standard Webhooks way with its own code (not ours): HMAC-SHA256 of
``{webhook-id}.{webhook-timestamp}.{raw body}`` keyed with the base64 after ``whsec_``, compared in
constant time with each ``v1,`` signature of the header, and a timestamp within five minutes. It
answers from a script (``statuses``: one status per request, the last one repeated), records every
request, and keeps the events it accepted once per ``webhook-id`` (``accepted``), as the spec tells
receivers to (a retry of an event it already processed is answered 200 and not processed again).

``hold_s`` keeps each request (or the first ``hold_first``) that long before answering (a slow
receiver); ``redirect_to`` answers 302 to that URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOLERANCE_S = 300


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    path: str
    signature_ok: bool
    why: str
    at: float

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> tuple[bool, str]:
    """The receiver's own check, written from the spec."""
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        return False, "missing headers"
    if not timestamp.isdigit() or abs((now or time.time()) - int(timestamp)) > TOLERANCE_S:
        return False, "timestamp out of tolerance"
    key = base64.b64decode(secret.split("_", 1)[1])
    expected = hmac.new(key, msg_id.encode() + b"." + timestamp.encode() + b"." + body, hashlib.sha256).digest()
    for item in signatures.split(" "):
        version, _, value = item.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(value), expected):
            return True, ""
    return False, "no matching signature"


class WebhookReceiver:
    def __init__(
        self, statuses: list[int] | None = None, hold_s: float = 0.0, redirect_to: str = "", hold_first: int = 0
    ) -> None:
        self.statuses = list(statuses or [200])
        self.hold_s = hold_s
        self.hold_first = hold_first  # hold only the first this many requests (0: all)
        self.redirect_to = redirect_to
        self.secret = ""  # set once the endpoint exists
        self.requests: list[Received] = []
        self.accepted: dict[str, dict[str, Any]] = {}  # webhook-id -> event, processed once
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                ok, why = verify(receiver.secret, headers, body) if receiver.secret else (False, "no secret")
                with receiver.lock:
                    number = len(receiver.requests)
                    receiver.requests.append(Received(headers, body, self.path, ok, why, time.time()))
                    status = receiver.statuses[min(number, len(receiver.statuses) - 1)]
                    if ok and 200 <= status < 300:
                        receiver.accepted.setdefault(headers["webhook-id"], json.loads(body))
                    receiver.arrived.notify_all()
                if receiver.hold_s and (not receiver.hold_first or number < receiver.hold_first):
                    time.sleep(receiver.hold_s)
                if receiver.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", receiver.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = json.dumps({"ok": 200 <= status < 300, "why": why}).encode()
                self.send_response(status if ok or status >= 300 else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def wait_for(self, count: int, timeout: float = 30.0, *, accepted: bool = False) -> list[Received]:
        """Block until ``count`` requests arrived (or ``count`` distinct events were accepted)."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while (len(self.accepted) if accepted else len(self.requests)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"expected {count} {'accepted events' if accepted else 'requests'}, got "
                        f"{len(self.accepted) if accepted else len(self.requests)}: {self.requests}"
                    )
                self.arrived.wait(left)
            return list(self.requests)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
