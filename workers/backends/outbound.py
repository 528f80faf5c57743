"""Rules for every request we send to a backend: where it may go, and what its errors may repeat.

- :func:`url_problem`: a backend URL may not carry credentials (they belong in the API key, which is
  write-only) nor point at a link-local or cloud-metadata address, where a probe or a job would read
  instance credentials back (SSRF). Private LAN addresses stay allowed: GPU hosts live there. The
  model validator refuses such URLs, and adapters and probes check again at call time, for rows
  written before the rule.
- :func:`scrub`: an error text with every form of a secret removed: raw, Python-escaped (``repr``
  of a str or of bytes, which is how h11 reports an illegal header value), JSON-escaped and URL-encoded.
- :func:`scrubbing`: what an adapter's call raises, scrubbed; :func:`refuse_unsafe`: both checks above
  as a ``BackendError`` before a call.
- :func:`transport_summary`: a connection failure described without quoting what the server sent.
- :func:`header_problem`: an API key that cannot travel in an HTTP header is refused before sending,
  so the HTTP library never gets to quote it back in its error.
- :func:`non_public`: why an address is not on the public internet (loopback, private, CGNAT,
  unspecified, multicast, reserved...): URLs that customers give us (webhooks) may reach only those
  that are, where a backend URL may sit on the LAN.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
from collections.abc import Iterator
from urllib.parse import quote, quote_plus, urlsplit

from workers.backends.base import BackendConfig, BackendError

REDACTED = "[redacted]"
# Hostnames that name the metadata service on the usual clouds, besides its literal addresses.
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"})
# AWS's IPv6 metadata address; the IPv4 one (169.254.169.254) is link-local like the rest of 169.254/16.
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254")})
# Fragments of a secret shorter than this are too common to scrub on their own.
MIN_FRAGMENT = 6


def literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` names literally, in any form the resolver accepts (``2852039166``, ``0xa9fea9fe``)."""
    host = host.strip("[]").split("%", 1)[0].rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def url_problem(url: str) -> str | None:
    """Why ``url`` may not be a backend's base URL, or None when it may."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "Not a valid URL."
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "Credentials in the URL are not allowed: put them in the API key."
    if host.rstrip(".").lower() in METADATA_HOSTS:
        return f"{host} is a cloud metadata service: not allowed as a backend."
    ip = literal_ip(host)
    if ip is None:
        return None
    mapped = getattr(ip, "ipv4_mapped", None) or getattr(ip, "sixtofour", None)
    for address in (ip, mapped):
        if address is not None and (address.is_link_local or address in METADATA_ADDRESSES):
            return f"{host} is a link-local or metadata address: not allowed as a backend."
    return None


# Address blocks that ``ipaddress`` does not flag as private but that no public server lives in.
CGNAT = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598): "shared", not global
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: embeds an IPv4 address


def _embedded_v4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped ``::ffff:a.b.c.d``, 6to4, NAT64), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def non_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public internet address (``"loopback"``, ``"private"``...), or None when it is.

    An IPv6 address that embeds an IPv4 one (mapped, 6to4, NAT64) is judged by that one too, so
    ``::ffff:127.0.0.1`` is loopback.
    """
    for address in (_embedded_v4(ip), ip):  # the embedded one first: it names the real kind
        if address is None:
            continue
        if address in METADATA_ADDRESSES:
            return "cloud metadata"
        for kind, test in (
            ("unspecified", address.is_unspecified),
            ("loopback", address.is_loopback),
            ("link-local", address.is_link_local),
            ("multicast", address.is_multicast),
            ("carrier-grade NAT", isinstance(address, ipaddress.IPv4Address) and address in CGNAT),
            ("private", address.is_private),
            ("reserved", address.is_reserved),
            ("not globally routable", not address.is_global),
        ):
            if test:
                return kind
    return None


def header_problem(api_key: str) -> str | None:
    """Why ``api_key`` cannot be sent as a bearer token (never quoting it), or None."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in api_key):
        return "The backend's API key holds a control character (a newline?); it cannot be sent."
    try:
        api_key.encode("ascii")
    except UnicodeEncodeError:
        return "The backend's API key holds a non-ASCII character; it cannot be sent."
    return None


def secret_forms(secret: str) -> list[str]:
    """Every way ``secret`` may be written in an error text, longest first."""
    if not secret:
        return []
    forms = {
        secret,
        repr(secret)[1:-1],
        repr(secret.encode("utf-8", "backslashreplace"))[2:-1],
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        quote(secret, safe=""),
        quote_plus(secret, safe=""),
        quote(secret),
        secret.encode("unicode_escape").decode("ascii"),
    }
    # A key split by a control character may be reported one line at a time.
    forms.update(p for p in re.split(r"[\x00-\x1f\x7f\s]+", secret) if len(p) >= MIN_FRAGMENT)
    return sorted((f for f in forms if f), key=len, reverse=True)


def scrub(text: str, *secrets: str) -> str:
    """``text`` with every form of every secret replaced by ``[redacted]``."""
    for secret in secrets:
        for form in secret_forms(secret):
            text = text.replace(form, REDACTED)
    return text


def transport_summary(exc: Exception) -> str:
    """A failed connection in our words: the class, and the OS's message for a network error. A protocol
    error's text quotes the bytes the other side sent (``illegal status line: bytearray(b'SSH-2.0-...')``),
    which is how a URL aimed at a non-HTTP internal service would read its banner back, so it is left out."""
    import httpx  # here: the model validator imports this module in web processes, which need no client

    if isinstance(exc, httpx.ProtocolError):
        return f"{type(exc).__name__} (the answer is not valid HTTP)"
    return f"{type(exc).__name__}: {exc}"


def refuse_unsafe(backend: BackendConfig) -> None:
    """Raise a permanent ``BackendError`` when the backend's URL or key must not be used for a call."""
    problem = url_problem(backend.base_url) or (header_problem(backend.api_key) if backend.api_key else None)
    if problem:
        raise BackendError(f"Refused to call this backend: {problem}", retryable=False)


@contextlib.contextmanager
def scrubbing(*secrets: str) -> Iterator[None]:
    """Errors raised inside lose every form of ``secrets``: a ``BackendError``'s message is scrubbed in
    place; any other exception whose text holds a secret becomes a permanent ``BackendError`` without it
    (so neither the job's error nor a logged traceback can show the secret)."""
    secrets = tuple(s for s in secrets if s)
    try:
        yield
    except BackendError as exc:
        if secrets:
            exc.message = scrub(exc.message, *secrets)
            exc.args = (exc.message,)
        raise
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if secrets and scrub(text, *secrets) != text:
            raise BackendError(scrub(text, *secrets), retryable=False) from None
        raise
