"""/metrics' bearer token is compared safely whatever bytes the header holds: a wrong one is a 401."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest

TOKEN = "test-metrics-token"


@pytest.mark.django_db
def test_non_ascii_bearer_token_is_a_401_not_a_500(client, settings):
    settings.METRICS_TOKEN = TOKEN
    for offered in ("éé", "tést-metrics-token", "\udcff", "é" * 500):
        r = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {offered}")
        assert r.status_code == 401, (offered, r.status_code)
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200


def raw_get(base: str, path: str, header: bytes) -> bytes:
    """One HTTP/1.0 request with the Authorization header's raw bytes; the status line back."""
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        request = b"GET " + path.encode() + b" HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: " + header
        sock.sendall(request + b"\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_any_bytes_in_the_header_through_gunicorn_are_a_401(gunicorn_server, monkeypatch):
    monkeypatch.setenv("METRICS_TOKEN", TOKEN)
    base = gunicorn_server(workers=1)
    for header in (b"Bearer \xc3\xa9\xc3\xa9", b"Bearer \xff\xfe", b"Bearer \x80" + TOKEN.encode()):
        status = raw_get(base, "/metrics", header)
        assert status.split()[1] == b"401", (header, status)
    assert raw_get(base, "/metrics?scope=process", b"Bearer " + TOKEN.encode()).split()[1] == b"200"
