"""Periodic probes feed the circuit: a dead backend opens before any job fails on it."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from orchestrator_site.redis import redis_client
from routing import circuit, policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import free_port
from tests.fakes.ollama_server import OllamaFake

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_dead_backend_opens_its_circuit_and_routing_skips_it(api, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    Backend.objects.create(
        name="gone", kind=BackendKind.OLLAMA, base_url=dead, model="llama3.2", config={"circuit_failures": 2}
    )
    Backend.objects.create(name="spare", kind=BackendKind.DEV)
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["gone", "spare"]}))
    call_command("probe_backends", timeout=1)
    assert "gone: down" in capsys.readouterr().out
    assert circuit.status("gone").state == "closed"  # one failure is not an outage yet
    call_command("probe_backends", timeout=1)
    assert circuit.status("gone").state == "open"
    assert "health probe: down" in circuit.status("gone").reason
    r = api.post("/jobs", {"prompt": "hi"}, format="json")
    assert r.json()["backend"] == "spare"


def test_a_healthy_backend_is_recorded_and_left_closed(capsys):
    with OllamaFake() as fake:
        Backend.objects.create(name="ol", kind=BackendKind.OLLAMA, base_url=fake.url, model="llama3.2")
        Backend.objects.create(name="off", kind=BackendKind.OLLAMA, base_url=fake.url, model="x", enabled=False)
        call_command("probe_backends", timeout=2)
    out = capsys.readouterr().out
    assert "ol: ok in" in out and "off" not in out
    assert circuit.status("ol").state == "closed"
    assert redis_client().hget("llmo:probe:ol", "status") == b"ok"
