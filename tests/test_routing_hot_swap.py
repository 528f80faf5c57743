"""A policy activated through the API governs the next job in every one of 4 gunicorn processes
within a second, with no restart. Each process records which registry it loaded and when
(``routing.registry.LOADED_KEY``), so the test knows every process switched, and how fast."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from rest_framework.authtoken.models import Token

from orchestrator_site.redis import redis_client
from routing import policies, registry
from routing.models import Backend, BackendKind, RoutingPolicy

WORKERS = 4


def web_processes() -> dict[str, tuple[str, float]]:
    return {p: v for p, v in registry.loaded_by_process().items() if not p.endswith(f":{os.getpid()}")}


@pytest.mark.slow
def test_activation_reaches_all_four_web_processes_within_a_second(gunicorn_server, django_user_model):
    for name in ("alpha", "beta"):
        Backend.objects.create(name=name, kind=BackendKind.DEV)
    first = RoutingPolicy.objects.create(name="first", strategy="ordered", params={"order": ["alpha", "beta"]})
    second = RoutingPolicy.objects.create(name="second", strategy="ordered", params={"order": ["beta", "alpha"]})
    policies.activate(first)
    staff = django_user_model.objects.create_superuser("ops", password="pw-ops-123")
    headers = {"Authorization": f"Token {Token.objects.create(user=staff).key}"}
    base = gunicorn_server(workers=WORKERS)

    with httpx.Client(base_url=base, headers=headers, timeout=10) as http, ThreadPoolExecutor(16) as pool:

        def burst(n: int = 16) -> list[dict]:
            def one(i: int) -> dict:
                r = http.post("/jobs", json={"prompt": f"job {i}"})
                assert r.status_code == 202, r.text
                return r.json()

            return list(pool.map(one, range(n)))

        # Warm: every process has routed under the first policy.
        deadline = time.monotonic() + 30
        jobs: list[dict] = []
        while len(web_processes()) < WORKERS and time.monotonic() < deadline:
            jobs += burst()
        assert len(web_processes()) == WORKERS, web_processes()
        assert {(j["policy"], j["backend"]) for j in jobs} == {("first", "alpha")}

        activated_at = time.time()
        assert http.post(f"/policies/{second.pk}/activate").status_code == 200
        token = redis_client().get(registry.VERSION_KEY).decode()

        after: list[dict] = []
        while time.time() < activated_at + 1.0:
            after += burst()
            if all(t == token for t, _ in web_processes().values()):
                break
        loaded = web_processes()
        assert all(t == token for t, _ in loaded.values()), f"not every process switched within 1 s: {loaded}"
        lag = max(at for _, at in loaded.values()) - activated_at
        print(f"\n{WORKERS} processes routed under the new policy {lag * 1000:.0f} ms after activation")
        assert lag < 1.0
        # The very first job each process routed after the activation already used it.
        assert {(j["policy"], j["backend"]) for j in after} == {("second", "beta")}
