"""``REDIS_URL`` in its two forms: one Redis server, or a Sentinel-watched primary.

``redis://[[user]:password@]host[:port]/db`` (or ``rediss://``, ``unix://``) names one server, as redis-py
reads it. ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`` names the
Sentinels (port 26379 unless given) and the service (the name in ``sentinel monitor``); every process
asks them for the current primary and asks again after a connection error, so a failover needs no
restart. The user and password are the data nodes'; the Sentinels' own password, when they have one, is
the query parameter ``sentinel_password``. Only the primary is used (no reads from replicas): the status
mirror, idempotency keys and queues need to read their own writes.

Pure parsing, no Django settings: ``settings.py`` builds the cache (and so RQ's connection) from it, and
``orchestrator_site.redis`` builds the asyncio client of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """Where a Sentinel-watched primary is found: the Sentinels, the service name and the database."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel(url: str, name: str = "REDIS_URL") -> SentinelTarget:
    """The parts of a ``redis+sentinel://`` URL; ``ImproperlyConfigured`` naming ``name`` when malformed."""
    form = f"{SENTINEL_SCHEME}://[[user]:password@]host[:port][,host[:port]...]/service[/db]"
    parts = urlsplit(url)
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise ImproperlyConfigured(f"{name} is not a Sentinel URL (expected {form})")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, password = None, None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = []
    for item in hosts.split(","):
        host, port = _host_port(item.strip(), name, form)
        sentinels.append((host, port))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ImproperlyConfigured(f"{name} must name the Sentinel service after the hosts ({form})")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ImproperlyConfigured(f"{name}: the database {path[1]!r} is not a number ({form})")
        db = int(path[1])
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ImproperlyConfigured(f"{name}: unknown option(s) {', '.join(sorted(unknown))} (only sentinel_password)")
    return SentinelTarget(
        sentinels=tuple(sentinels),
        service=unquote(path[0]),
        db=db,
        username=username,
        password=password,
        sentinel_password=query.get("sentinel_password", [None])[0],
    )


def _host_port(item: str, name: str, form: str) -> tuple[str, int]:
    if not item:
        raise ImproperlyConfigured(f"{name} names no Sentinel host ({form})")
    if item.startswith("["):  # an IPv6 literal
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ImproperlyConfigured(f"{name}: {item!r} has no host ({form})")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ImproperlyConfigured(f"{name}: {item!r} has no valid port ({form})")
    return host, int(port_text)


def cache_config(url: str, *, connect_timeout_s: float, socket_timeout_s: float) -> dict:
    """django-redis's ``CACHES['default']`` for ``url`` (the LOCATION and OPTIONS that differ by form).

    With Sentinel the connection factory asks the Sentinels for the primary (django-redis's
    ``SentinelConnectionFactory``); the client stays the default one so every read goes to the primary.
    RQ takes the same connection (``USE_REDIS_CACHE``), so queues follow a failover too.
    """
    options: dict = {
        "CLIENT_CLASS": "django_redis.client.DefaultClient",
        "SOCKET_CONNECT_TIMEOUT": connect_timeout_s,
        "SOCKET_TIMEOUT": socket_timeout_s,
        "CONNECTION_POOL_KWARGS": {"health_check_interval": 30},
    }
    if not is_sentinel(url):
        return {"LOCATION": url, "OPTIONS": options}
    target = parse_sentinel(url)
    options.update(
        CONNECTION_FACTORY="django_redis.pool.SentinelConnectionFactory",
        SENTINELS=list(target.sentinels),
        SENTINEL_KWARGS=sentinel_kwargs(target, connect_timeout_s, socket_timeout_s),
    )
    if target.username:
        options["USERNAME"] = target.username
    if target.password:
        options["PASSWORD"] = target.password
    # The factory reads the service name from the URL's host part (``redis://<service>/<db>``).
    return {"LOCATION": f"redis://{target.service}/{target.db}", "OPTIONS": options}


def sentinel_kwargs(target: SentinelTarget, connect_timeout_s: float, socket_timeout_s: float) -> dict:
    """How to talk to the Sentinels themselves: short timeouts, so a dead one is skipped quickly."""
    found: dict = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": min(socket_timeout_s, 2)}
    if target.sentinel_password:
        found["password"] = target.sentinel_password
    return found
