"""The routing decision: eligibility, the `ordered` strategy, and a policy switch that every
web process follows on its next decision."""

from __future__ import annotations

import httpx
import pytest
from rest_framework.authtoken.models import Token

from routing import policies
from routing.eligibility import split_eligible
from routing.models import Backend, BackendKind, RoutingPolicy
from routing.registry import PolicySnapshot, Snapshot
from routing.services import NoActivePolicy, NoEligibleBackend, PinnedBackendIneligible, UnknownBackend, route
from routing.strategies import BackendStats, Candidate, JobFacts, get_strategy

TEXT = Candidate(name="text", kind="dev", max_context_tokens=100)
VISION = Candidate(name="vision", kind="dev", supports_multimodal=True, model="llava")
OFF = Candidate(name="off", kind="dev", enabled=False)


def snap(*candidates: Candidate, order: list[str] | None = None, strategy: str = "ordered") -> Snapshot:
    return Snapshot(
        token="t",
        policy=PolicySnapshot(1, "p", strategy, {"order": order or []}, 1),
        candidates=tuple(candidates),
        backends={},
    )


def test_eligibility_names_each_reason():
    job = JobFacts(has_images=True, prompt_tokens=10)
    eligible, rejected = split_eligible(job, [TEXT, VISION, OFF], {"vision": BackendStats(circuit_open=False)})
    assert [c.name for c in eligible] == ["vision"]
    assert rejected == {"text": "no multimodal support", "off": "disabled"}
    _, rejected = split_eligible(JobFacts(prompt_tokens=90, max_tokens=20), [TEXT], {})
    assert "context 100 tokens < 110 needed" in rejected["text"]
    _, rejected = split_eligible(JobFacts(model="llama3"), [VISION], {})
    assert "serves model 'llava'" in rejected["vision"]
    _, rejected = split_eligible(JobFacts(), [TEXT], {"text": BackendStats(circuit_open=True)})
    assert rejected == {"text": "circuit open"}


def test_ordered_follows_the_order_then_names():
    ranked = get_strategy("ordered").rank(
        JobFacts(), [TEXT, VISION, Candidate(name="a", kind="dev")], {}, {"order": ["vision", "text"]}
    )
    assert [r.name for r in ranked] == ["vision", "text", "a"]


def test_ordered_rejects_bad_params():
    with pytest.raises(ValueError, match="order"):
        get_strategy("ordered").validate_params({"order": "vision"})
    with pytest.raises(ValueError, match="unknown"):
        get_strategy("ordered").validate_params({"oder": []})


def test_route_records_policy_candidates_and_reason():
    decision = route(JobFacts(), snap(TEXT, VISION, order=["vision", "text"]))
    assert decision.backend == "vision" and decision.policy == "p"
    assert [c["backend"] for c in decision.candidates] == ["vision", "text"]


def test_route_errors_say_what_is_wrong():
    with pytest.raises(NoActivePolicy):
        route(JobFacts(), Snapshot(token="t", policy=None, candidates=(TEXT,), backends={}))
    with pytest.raises(NoEligibleBackend, match="text: no multimodal support"):
        route(JobFacts(requires_multimodal=True), snap(TEXT))
    with pytest.raises(UnknownBackend):
        route(JobFacts(pinned_backend="ghost"), snap(TEXT))
    with pytest.raises(PinnedBackendIneligible, match="disabled"):
        route(JobFacts(pinned_backend="off"), snap(TEXT, OFF))


@pytest.mark.slow
def test_policy_switch_reaches_every_web_process_on_the_next_job(gunicorn_server, django_user_model):
    for name in ("alpha", "beta"):
        Backend.objects.create(name=name, kind=BackendKind.DEV)
    first = RoutingPolicy.objects.create(name="first", strategy="ordered", params={"order": ["alpha", "beta"]})
    second = RoutingPolicy.objects.create(name="second", strategy="ordered", params={"order": ["beta", "alpha"]})
    policies.activate(first)
    staff = django_user_model.objects.create_superuser("ops", password="pw-ops-123")
    headers = {"Authorization": f"Token {Token.objects.create(user=staff).key}"}
    base = gunicorn_server(workers=3)
    with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
        # Warm every process's snapshot with the first policy.
        assert {http.post("/jobs", json={"prompt": "x"}).json()["backend"] for _ in range(12)} == {"alpha"}
        assert http.post(f"/policies/{second.pk}/activate").status_code == 200
        after = [http.post("/jobs", json={"prompt": "y"}).json() for _ in range(12)]
        assert {(j["policy"], j["backend"]) for j in after} == {("second", "beta")}
        # Editing the active policy's params takes effect the same way.
        r = http.patch(f"/policies/{second.pk}", json={"params": {"order": ["alpha"]}})
        assert r.status_code == 200, r.text
        assert {http.post("/jobs", json={"prompt": "z"}).json()["backend"] for _ in range(12)} == {"alpha"}
