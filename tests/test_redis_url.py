"""REDIS_URL's Sentinel form: parsed into the Sentinels, service and database, or refused naming the problem."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from orchestrator_site.redis_url import SentinelTarget, cache_config, is_sentinel, parse_sentinel


def test_sentinel_url_names_every_sentinel_the_service_and_the_db():
    url = "redis+sentinel://:s3cr%40t@10.0.0.1:26380,10.0.0.2,[fd00::3]:26381/mymaster/4?sentinel_password=sp"
    assert is_sentinel(url) and not is_sentinel("redis://127.0.0.1:6379/0")
    assert parse_sentinel(url) == SentinelTarget(
        sentinels=(("10.0.0.1", 26380), ("10.0.0.2", 26379), ("fd00::3", 26381)),
        service="mymaster",
        db=4,
        password="s3cr@t",
        sentinel_password="sp",
    )


def test_sentinel_url_without_db_uses_db_0_and_a_user_when_given():
    target = parse_sentinel("redis+sentinel://app:pw@h1:26379/cache")
    assert (target.db, target.username, target.password, target.service) == (0, "app", "pw", "cache")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis+sentinel://h1:26379", "service"),
        ("redis+sentinel://h1:26379/m/x", "not a number"),
        ("redis+sentinel://h1:26379/m/0/extra", "service"),
        ("redis+sentinel://h1:99999/m/0", "valid port"),
        ("redis+sentinel://h1:26379,,h2/m/0", "no Sentinel host"),
        ("redis+sentinel://h1/m/0?db=2", "unknown option"),
    ],
)
def test_malformed_sentinel_url_is_refused_naming_the_problem(url, fragment):
    with pytest.raises(ImproperlyConfigured, match="REDIS_URL") as info:
        parse_sentinel(url)
    assert fragment in str(info.value)


def test_cache_config_uses_the_sentinel_factory_and_reads_from_the_primary_only():
    found = cache_config("redis+sentinel://:pw@h1,h2:26380/mymaster/3", connect_timeout_s=2, socket_timeout_s=5)
    options = found["OPTIONS"]
    assert found["LOCATION"] == "redis://mymaster/3"
    assert options["CONNECTION_FACTORY"] == "django_redis.pool.SentinelConnectionFactory"
    assert options["CLIENT_CLASS"] == "django_redis.client.DefaultClient"  # no replica reads
    assert options["SENTINELS"] == [("h1", 26379), ("h2", 26380)] and options["PASSWORD"] == "pw"
    plain = cache_config("redis://127.0.0.1:6379/2", connect_timeout_s=2, socket_timeout_s=5)
    assert plain["LOCATION"] == "redis://127.0.0.1:6379/2" and "CONNECTION_FACTORY" not in plain["OPTIONS"]
