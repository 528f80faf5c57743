"""A policy activated through the API governs the next job in every one of 4 gunicorn processes,
with no restart. Each process records which registry it loaded (``routing.registry.LOADED_KEY``), so
the test knows every process switched. How soon after the activation: bench/hot_swap.py."""

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
def test_activation_governs_the_next_decision_in_all_four_web_processes(gunicorn_server, django_user_model):
    for name in ("alpha", "beta"):
        Backend.objects.create(name=name, kind=BackendKind.DEV)
    first = RoutingPolicy.objects.create(name="first", strategy="ordered", params={"order": ["alpha", "beta"]})
    second = RoutingPolicy.objects.create(name="second", strategy="ordered", params={"order": ["beta", "alpha"]})
    policies.activate(first)
    staff = django_user_model.objects.create_superuser("ops", password="pw-ops-123")
    headers = {"Authorization": f"Token {Token.objects.create(user=staff).key}"}
    base = gunicorn_server(workers=WORKERS)

    # A connection per request: uvicorn keeps connections alive, and reused ones would stay with the
    # processes that accepted them first, so one process might never see a request.
    headers["Connection"] = "close"
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http, ThreadPoolExecutor(16) as pool:

        def burst(n: int = 16) -> list[dict]:
            def one(i: int) -> dict:
                r = http.post("/jobs", json={"prompt": f"job {i}"})
                assert r.status_code == 202, r.text
                return r.json()

            return list(pool.map(one, range(n)))

        def until_every_process(done, what: str) -> list[dict]:
            """Bursts of jobs until ``done()``; a bound no loaded machine reaches, not a latency goal."""
            deadline = time.monotonic() + 60
            jobs: list[dict] = []
            while not done():
                assert time.monotonic() < deadline, f"not every process {what}: {web_processes()}"
                jobs += burst()
            return jobs

        # Warm: every process has routed under the first policy.
        jobs = until_every_process(lambda: len(web_processes()) == WORKERS, "routed a job")
        assert {(j["policy"], j["backend"]) for j in jobs} == {("first", "alpha")}

        assert http.post(f"/policies/{second.pk}/activate").status_code == 200
        token = redis_client().get(registry.VERSION_KEY).decode()
        after = until_every_process(
            lambda: all(t == token for t, _ in web_processes().values()), "loaded the new registry"
        )
        # Every job routed after the activation, in whichever process, already used the new policy.
        assert after and {(j["policy"], j["backend"]) for j in after} == {("second", "beta")}
