"""Where a webhook may be sent: public addresses only, checked when an endpoint is made and again at
every attempt (a name may resolve elsewhere by then: DNS rebinding).

An endpoint's URL is a customer's, so a request to it must not reach anything of ours (SSRF): on
top of the rules for every outbound URL (``workers.backends.outbound.url_problem``: no credentials
in it, no link-local or cloud-metadata address), every address the host resolves to must be public
(``outbound.non_public``): not loopback, private, carrier-grade NAT, unspecified, multicast or
reserved. ``WEBHOOK_ALLOW_PRIVATE`` lifts the loopback/private part for development and tests;
link-local, metadata, multicast and unspecified addresses stay refused. At send time the request
goes to an address this check passed (``resolve``), never to a second lookup's answer.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

from workers.backends import outbound

SCHEMES = {"http": 80, "https": 443}
ALWAYS_REFUSED = frozenset({"link-local", "cloud metadata", "multicast", "unspecified"})
MAX_ADDRESSES = 8  # of a name's addresses, tried in order until one connects

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(Exception):
    """The URL may not be called (its message says why, naming the address)."""


class Unresolved(Exception):
    """The host name does not resolve now (may be temporary: the attempt is retried)."""


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect and what to tell the server it is."""

    scheme: str
    host: str  # as in the URL (the Host header and the TLS server name)
    port: int
    target: str  # path and query
    addresses: tuple[Address, ...]

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == SCHEMES[self.scheme] else f"{host}:{self.port}"

    def url_for(self, address: Address) -> str:
        """The URL with the host replaced by ``address`` (so no second lookup happens)."""
        literal = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{literal}:{self.port}{self.target}"


def address_problem(ip: Address, *, allow_private: bool | None = None) -> str | None:
    """Why a request may not go to ``ip``, or None."""
    kind = outbound.non_public(ip)
    if kind is None:
        return None
    allow = settings.WEBHOOK_ALLOW_PRIVATE if allow_private is None else allow_private
    if allow and kind not in ALWAYS_REFUSED:
        return None
    hint = "" if kind in ALWAYS_REFUSED else " (WEBHOOK_ALLOW_PRIVATE=1 allows it in development)"
    return f"{ip} is a {kind} address: webhooks go to public addresses only{hint}."


def _split(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of ``url``; ``Refused`` when it is not a usable http(s) URL."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        raise Refused("Not a valid URL.") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise Refused("Only http and https URLs are allowed.")
    if not host:
        raise Refused("The URL has no host.")
    if parts.fragment:
        raise Refused("A URL with a #fragment is not allowed (it is never sent).")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise Refused("Credentials in the URL are not allowed: receivers check the signature instead.")
    if problem := outbound.url_problem(url):  # cloud metadata names and link-local literals
        raise Refused(problem.replace("as a backend", "as a webhook URL"))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host.rstrip(".").lower(), port or SCHEMES[scheme], target


def _is_local_name(host: str) -> bool:
    """``localhost`` and its subdomains always mean this machine (RFC 6761)."""
    return host == "localhost" or host.endswith(".localhost")


def resolve(url: str, *, allow_private: bool | None = None) -> Target:
    """The checked target of ``url``: every address its host resolves to must be allowed.

    Raises ``Refused`` (the URL or one of its addresses is not allowed) or ``Unresolved``.
    """
    scheme, host, port, target = _split(url)
    literal = outbound.literal_ip(host)
    if literal is not None:
        addresses: list[Address] = [literal]
    else:
        if _is_local_name(host):
            addresses = [ipaddress.ip_address("127.0.0.1")]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            except (socket.gaierror, UnicodeError) as exc:
                raise Unresolved(f"{host} does not resolve: {exc}") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
        if not addresses:
            raise Unresolved(f"{host} has no address.")
    for address in addresses:  # every one: a name with one public and one private address is refused
        if problem := address_problem(address, allow_private=allow_private):
            named = problem if literal is not None else f"{host} resolves to {problem}"
            raise Refused(named)
    return Target(scheme, host, port, target, tuple(addresses[:MAX_ADDRESSES]))


def url_problem(url: str, *, allow_private: bool | None = None) -> str | None:
    """Why ``url`` may not be an endpoint's URL (when it is made), or None.

    A name that does not resolve yet is accepted (it may before the first event; until then its
    attempts fail and are retried); one that resolves to a refused address is not.
    """
    try:
        resolve(url, allow_private=allow_private)
    except Refused as exc:
        return str(exc)
    except Unresolved:
        return None
    return None
