"""One webhook request: POST a signed body to a checked address, with hard bounds on everything.

- The address is one ``webhooks.destination.resolve`` passed (the URL's host is replaced by it; the
  ``Host`` header and the TLS server name stay the URL's, so certificates are checked for the name).
- No redirects (a 3xx is a failed attempt, as the Standard Webhooks spec asks), no proxies or
  ``.netrc`` from the environment, a fresh connection per attempt.
- Time: connect, send and every read are each bounded by ``WEBHOOK_TIMEOUT_S``, and the whole
  attempt by twice that: a watchdog shuts the socket down at the deadline, so a receiver that
  drips its answer byte by byte cannot hold a sender for longer.
- Size: at most ``WEBHOOK_RESPONSE_MAX_BYTES`` of the answer's body are read.
"""

from __future__ import annotations

import email.utils
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings

from webhooks.destination import Refused, Target, Unresolved, resolve
from workers.backends.outbound import transport_summary

USER_AGENT = "llm-orchestrator-webhooks/1"
_ssl_context: Any = None


class Outcome:
    """How an attempt went, as the metrics label it."""

    SUCCEEDED = "succeeded"
    HTTP_ERROR = "http_error"  # an answer, not 2xx (3xx included)
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"  # refused, reset, TLS, not resolvable
    REFUSED = "refused"  # the URL or an address it resolves to is not allowed: nothing was sent


@dataclass(frozen=True)
class Answer:
    """What one attempt got back."""

    outcome: str
    status_code: int | None = None
    latency_ms: int = 0
    error: str = ""
    response: str = ""
    retry_after_s: float | None = None

    @property
    def succeeded(self) -> bool:
        return self.outcome == Outcome.SUCCEEDED


def _context() -> Any:
    global _ssl_context
    if _ssl_context is None:  # loading the CA bundle costs milliseconds: once per process
        _ssl_context = httpx.create_ssl_context()
    return _ssl_context


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header as seconds from now (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _Watchdog:
    """Shuts the attempt's socket down at the deadline (a blocked read then fails at once)."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: remember the socket once it is connected."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            with self._lock:
                self._socket = sock
                if self.fired:
                    self._shutdown()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _error_text(status: int, response: httpx.Response) -> str:
    if 300 <= status < 400:
        where = response.headers.get("location", "")
        to = f" to {where[:200]}" if where else ""
        return f"HTTP {status}: redirect{to} not followed (update the endpoint's URL)."
    return f"HTTP {status}"


def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    data = b""
    if limit <= 0:
        return data
    for chunk in response.iter_raw(chunk_size=min(limit, 65536)):
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit]


def post(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float | None = None) -> Answer:
    """Send one attempt to ``url``; never raises for anything the network or the receiver does."""
    timeout = float(settings.WEBHOOK_TIMEOUT_S if timeout_s is None else timeout_s)
    started = time.monotonic()

    def ms() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        target = resolve(url)
    except Refused as exc:
        return Answer(Outcome.REFUSED, latency_ms=ms(), error=f"Refused: {exc}")
    except Unresolved as exc:
        return Answer(Outcome.CONNECTION_ERROR, latency_ms=ms(), error=str(exc))
    last: Answer | None = None
    for address in target.addresses:
        last = _post_to(target, address, body, headers, timeout, started)
        if last.outcome != Outcome.CONNECTION_ERROR:  # only a failed connect tries the next address
            return last
        if time.monotonic() - started >= timeout:
            break
    assert last is not None
    return last


def _post_to(
    target: Target, address: Any, body: bytes, headers: dict[str, str], timeout: float, started: float
) -> Answer:
    def ms() -> int:
        return int((time.monotonic() - started) * 1000)

    sent_headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **headers,
        "host": target.host_header,
    }
    extensions: dict[str, Any] = {}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.host
    left = max(0.05, 2 * timeout - (time.monotonic() - started))
    with _Watchdog(left) as dog:
        extensions["trace"] = dog.trace
        try:
            with httpx.Client(
                verify=_context(), follow_redirects=False, trust_env=False, timeout=httpx.Timeout(timeout)
            ) as client:
                request = client.build_request(
                    "POST", target.url_for(address), content=body, headers=sent_headers, extensions=extensions
                )
                response = client.send(request, stream=True)
                try:
                    status = response.status_code
                    try:
                        raw = _read_bounded(response, int(settings.WEBHOOK_RESPONSE_MAX_BYTES))
                    except httpx.HTTPError:
                        raw = b""  # the status is what counts; a broken body after it is not a failure
                    text = raw.decode("utf-8", "replace")
                    if 200 <= status < 300:
                        return Answer(Outcome.SUCCEEDED, status, ms(), "", text)
                    retry_after = retry_after_seconds(response.headers.get("retry-after"))
                    return Answer(Outcome.HTTP_ERROR, status, ms(), _error_text(status, response), text, retry_after)
                finally:
                    response.close()
        except httpx.TimeoutException:
            return Answer(Outcome.TIMEOUT, latency_ms=ms(), error=f"Timed out after {ms()} ms (to {address}).")
        except httpx.HTTPError as exc:
            if dog.fired:
                return Answer(Outcome.TIMEOUT, latency_ms=ms(), error=f"Timed out after {ms()} ms (to {address}).")
            return Answer(Outcome.CONNECTION_ERROR, latency_ms=ms(), error=f"{transport_summary(exc)} (to {address})")
