"""Protocol-faithful fake LLM servers for tests: real HTTP servers on loopback, each in a thread.

They are fakes at the edge only (style.md): our adapters, the official ``ollama`` client and the
official ``openai`` SDK talk to them over real sockets, so a worker subprocess can reach them too.

Every fake shares the knobs here: ``latency_s`` (sleep before answering any request), ``fail_first``
(the first N generation calls fail), ``fail_rate`` (0..1, from a seeded RNG so a run is reproducible),
``fail_status``/``fail_message``/``retry_after`` (what a failure looks like), and a log of every request
received (method, path, headers, JSON body) for assertions. ``hold=True`` keeps every generation call
waiting inside the server until ``release()``, so a test decides when a call ends (``held`` counts
the calls waiting). Use them as context managers.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # the parsed JSON body, or None (no body, or not JSON: see json_error)
    raw: bytes
    json_error: str | None = None


class FakeHandler(BaseHTTPRequestHandler):
    """Reads the request, records it, hands it to the fake; offers JSON and chunked-stream writers."""

    protocol_version = "HTTP/1.1"  # keep-alive and chunked streaming, as the real servers speak
    timeout = 10  # an idle keep-alive connection must not pin a thread forever
    disable_nagle_algorithm = True  # headers and body go out in two writes; Nagle + delayed ACK would add ~40 ms
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body, error = None, None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                error = str(exc)
        path, _, query = self.path.partition("?")
        req = RecordedRequest(
            method=self.command,
            path=path,
            query=query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            raw=raw,
            json_error=error,
        )
        fake = self.server.fake
        fake._record(req)
        try:
            if req.path in fake.generation_paths:
                fake._wait_for_release()
            if fake.latency_s:
                fake.pause(fake.latency_s)
            fake.handle(self, req)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client gave up (e.g. its deadline passed, or a cancel)
            fake._client_gone()

    # --- writers -------------------------------------------------------------------
    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json; charset=utf-8", headers)

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self, status: int, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def drop(self) -> None:
        """Cut the connection mid-response, as a crashed server or proxy would."""
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # socketserver's default backlog of 5 resets parallel clients' connects
    fake: FakeServer

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), FakeHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class FakeServer:
    """Base of the fakes: lifecycle, failure knobs and the request log. Subclasses implement ``handle``."""

    #: paths whose calls count for fail_first / fail_rate (generation, not probes)
    generation_paths: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        fail_first: int = 0,
        fail_rate: float = 0.0,
        fail_status: int = 503,
        fail_message: str | None = None,
        retry_after: str | None = None,
        seed: int = 0,
        hold: bool = False,
    ) -> None:
        self.latency_s = latency_s
        self.fail_first = fail_first
        self.fail_rate = fail_rate
        self.fail_status = fail_status
        self.fail_message = fail_message
        self.retry_after = retry_after
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._generation_calls = 0
        self._clients_gone = 0
        self._released = threading.Event()
        if not hold:
            self._released.set()
        self._held = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> Self:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name=type(self).__name__
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # wakes handlers sleeping on a latency knob
        self._server.shutdown()
        with self._server.sockets_lock:
            for sock in list(self._server.open_sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "fake server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:41234`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    # --- recording -----------------------------------------------------------------
    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(req)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    # --- knobs ---------------------------------------------------------------------
    def should_fail(self) -> bool:
        """Count one generation call and say whether the failure knobs make it fail."""
        with self._lock:
            self._generation_calls += 1
            if self._generation_calls <= self.fail_first:
                return True
            return bool(self.fail_rate) and self._rng.random() < self.fail_rate

    @property
    def generation_calls(self) -> int:
        with self._lock:
            return self._generation_calls

    def _wait_for_release(self) -> None:
        if self._released.is_set():
            return
        with self._lock:
            self._held += 1
        try:
            while not (self._released.wait(0.05) or self._stopping.is_set()):
                pass
        finally:
            with self._lock:
                self._held -= 1

    @property
    def held(self) -> int:
        """Generation calls waiting inside the server for ``release()`` (with ``hold=True``)."""
        with self._lock:
            return self._held

    def release(self) -> None:
        """Let held generation calls (and every later one) be answered."""
        self._released.set()

    def _client_gone(self) -> None:
        with self._lock:
            self._clients_gone += 1

    @property
    def clients_gone(self) -> int:
        """Responses cut short because the client closed the connection (a server stops generating then)."""
        with self._lock:
            return self._clients_gone

    def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the server stops (so teardown never waits on a slow knob)."""
        self._stopping.wait(seconds)

    def handle(self, h: FakeHandler, req: RecordedRequest) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def word_count(text: str) -> int:
    """The fakes' 'tokenizer': whitespace words, so tests can predict usage."""
    return len(text.split())
