"""``/backends`` and ``/policies``: staff edit the registry, everyone authenticated reads it,
secrets never leave, and a policy change governs the very next job (no restart)."""

from __future__ import annotations

import pytest

from jobs.models import Job
from routing.models import Backend, BackendKind, RoutingPolicy

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "sk-test-very-secret-4242"


def submit(client, body: dict | None = None) -> dict:
    resp = client.post("/jobs", body or {"prompt": "hello"}, format="json")
    assert resp.status_code == 202, resp.content
    return resp.json()


@pytest.fixture
def dev2(db) -> Backend:
    return Backend.objects.create(name="dev2", kind=BackendKind.DEV)


@pytest.fixture
def alt_policy(db, dev2) -> RoutingPolicy:
    return RoutingPolicy.objects.create(name="alt", strategy="ordered", params={"order": ["dev2", "dev"]})


# --- /backends ------------------------------------------------------------------------------
def test_staff_can_create_read_update_and_delete_a_backend(staff_api):
    resp = staff_api.post(
        "/backends",
        {"name": "local-llama", "kind": "ollama", "base_url": "http://gpu-1.lan.example:11434", "model": "llama3"},
        format="json",
    )
    assert resp.status_code == 201, resp.content
    created = resp.json()
    pk = created["id"]
    assert created["name"] == "local-llama"
    assert created["enabled"] is True
    assert created["has_api_key"] is False

    assert [b["name"] for b in staff_api.get("/backends").json()] == ["local-llama"]
    assert staff_api.get(f"/backends/{pk}").json()["model"] == "llama3"

    resp = staff_api.patch(f"/backends/{pk}", {"weight": 5, "enabled": False}, format="json")
    assert resp.status_code == 200, resp.content
    assert (resp.json()["weight"], resp.json()["enabled"]) == (5, False)

    resp = staff_api.put(
        f"/backends/{pk}/",
        {"name": "local-llama", "kind": "openai", "base_url": "https://api.example.com/v1", "model": "gpt-x"},
        format="json",
    )
    assert resp.status_code == 200, resp.content
    backend = Backend.objects.get(pk=pk)
    assert (backend.kind, backend.base_url, backend.model) == ("openai", "https://api.example.com/v1", "gpt-x")

    assert staff_api.delete(f"/backends/{pk}").status_code == 204
    assert not Backend.objects.filter(pk=pk).exists()
    assert staff_api.get(f"/backends/{pk}").status_code == 404


def test_non_staff_can_read_backends_but_not_write_them(api, dev_backend):
    assert [b["name"] for b in api.get("/backends").json()] == ["dev"]
    assert api.get(f"/backends/{dev_backend.pk}/").json()["name"] == "dev"

    assert api.post("/backends", {"name": "mine", "kind": "dev"}, format="json").status_code == 403
    assert api.patch(f"/backends/{dev_backend.pk}", {"enabled": False}, format="json").status_code == 403
    assert api.put(f"/backends/{dev_backend.pk}", {"name": "dev", "kind": "dev"}, format="json").status_code == 403
    assert api.delete(f"/backends/{dev_backend.pk}").status_code == 403

    assert list(Backend.objects.values_list("name", "enabled")) == [("dev", True)]


def test_api_key_is_write_only(staff_api, api, user):
    resp = staff_api.post(
        "/backends",
        {"name": "cloud", "kind": "openai", "base_url": "https://api.example.com/v1", "api_key": SECRET},
        format="json",
    )
    assert resp.status_code == 201, resp.content
    pk = resp.json()["id"]
    assert "api_key" not in resp.json()
    assert resp.json()["has_api_key"] is True
    assert SECRET not in resp.content.decode()
    assert Backend.objects.get(pk=pk).api_key == SECRET

    for client in (staff_api, api):
        for path in ("/backends", f"/backends/{pk}"):
            resp = client.get(path)
            assert resp.status_code == 200
            assert SECRET not in resp.content.decode()
            assert "api_key" not in (resp.json()[0] if isinstance(resp.json(), list) else resp.json())

    # Editing another field keeps the key; an empty key clears it.
    resp = staff_api.patch(f"/backends/{pk}", {"weight": 3}, format="json")
    assert resp.json()["has_api_key"] is True
    assert SECRET not in resp.content.decode()
    assert Backend.objects.get(pk=pk).api_key == SECRET
    resp = staff_api.patch(f"/backends/{pk}", {"api_key": ""}, format="json")
    assert resp.status_code == 200
    assert resp.json()["has_api_key"] is False
    assert Backend.objects.get(pk=pk).api_key == ""


def test_api_key_never_appears_in_a_jobs_status_document(staff_api, api, policy):
    resp = staff_api.post(
        "/backends",
        {"name": "cloud", "kind": "openai", "base_url": "https://api.example.com/v1", "api_key": SECRET},
        format="json",
    )
    assert resp.status_code == 201
    job = submit(api, {"prompt": "hi", "backend": "cloud"})
    assert job["backend"] == "cloud"
    for path in (f"/jobs/{job['id']}", "/jobs?page_size=10"):
        assert SECRET not in api.get(path).content.decode()
        assert SECRET not in staff_api.get(path).content.decode()


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "oa", "kind": "openai"}, "base_url"),
        ({"name": "ol", "kind": "ollama", "base_url": ""}, "base_url"),
        ({"name": "hf", "kind": "hf_local", "model": "some/model"}, "pool"),
        ({"name": "d", "kind": "dev", "config": ["not", "an", "object"]}, "config"),
        ({"name": "d", "kind": "warp-drive"}, "kind"),
        ({"name": "not a slug", "kind": "dev"}, "name"),
        ({"name": "dev", "kind": "dev"}, "name"),  # taken
        ({"name": "d", "kind": "dev", "max_concurrency": 0}, "max_concurrency"),
        ({"name": "d", "kind": "ollama", "base_url": "not a url"}, "base_url"),
    ],
    ids=[
        "openai-needs-base-url",
        "ollama-needs-base-url",
        "hf-local-needs-pool",
        "config-must-be-object",
        "unknown-kind",
        "bad-name",
        "duplicate-name",
        "zero-concurrency",
        "bad-url",
    ],
)
def test_invalid_backend_is_400_naming_the_field(staff_api, dev_backend, body, field):
    resp = staff_api.post("/backends", body, format="json")
    assert resp.status_code == 400, resp.content
    assert field in resp.json()
    assert list(Backend.objects.values_list("name", flat=True)) == ["dev"]


@pytest.mark.parametrize(
    "base_url", ["http://ollama:11434", "http://gpu-1:11434/", "http://localhost:11434", "http://10.0.0.7:8000/v1"]
)
def test_base_url_may_name_a_compose_service_or_lan_host(staff_api, base_url):
    """``http://ollama:11434`` is how a container reaches Ollama under docker compose."""
    resp = staff_api.post("/backends", {"name": "local", "kind": "ollama", "base_url": base_url}, format="json")
    assert resp.status_code == 201, resp.content
    assert Backend.objects.get(name="local").base_url == base_url


def test_changing_kind_on_update_applies_the_same_rules(staff_api, dev_backend):
    resp = staff_api.patch(f"/backends/{dev_backend.pk}", {"kind": "openai"}, format="json")
    assert resp.status_code == 400
    assert "base_url" in resp.json()
    assert Backend.objects.get(pk=dev_backend.pk).kind == "dev"


# --- /policies ------------------------------------------------------------------------------
def test_staff_can_create_read_update_and_delete_a_policy(staff_api, dev_backend):
    resp = staff_api.post(
        "/policies", {"name": "cheap-first", "strategy": "ordered", "params": {"order": ["dev"]}}, format="json"
    )
    assert resp.status_code == 201, resp.content
    created = resp.json()
    pk = created["id"]
    assert (created["is_active"], created["version"]) == (False, 1)
    assert [p["name"] for p in staff_api.get("/policies").json()] == ["cheap-first"]

    resp = staff_api.patch(f"/policies/{pk}", {"params": {"order": []}, "description": "d"}, format="json")
    assert resp.status_code == 200, resp.content
    assert resp.json()["params"] == {"order": []}
    assert resp.json()["version"] == 2

    assert staff_api.delete(f"/policies/{pk}/").status_code == 204
    assert not RoutingPolicy.objects.filter(pk=pk).exists()


def test_non_staff_can_read_policies_but_not_write_them(api, policy):
    assert [p["name"] for p in api.get("/policies").json()] == ["default"]
    assert api.get(f"/policies/{policy.pk}").json()["is_active"] is True
    assert api.post("/policies", {"name": "x", "strategy": "ordered"}, format="json").status_code == 403
    assert api.patch(f"/policies/{policy.pk}", {"params": {}}, format="json").status_code == 403
    assert api.delete(f"/policies/{policy.pk}").status_code == 403
    assert api.post(f"/policies/{policy.pk}/activate").status_code == 403
    assert RoutingPolicy.objects.get().params == {"order": ["dev"]}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "p", "strategy": "random-walk"}, "strategy"),
        ({"name": "p"}, "strategy"),
        ({"name": "p", "strategy": "ordered", "params": {"order": "dev"}}, "params"),
        ({"name": "p", "strategy": "ordered", "params": {"order": [1, 2]}}, "params"),
        ({"name": "p", "strategy": "ordered", "params": {"order": ["dev"], "colour": "red"}}, "params"),
        ({"name": "p", "strategy": "ordered", "params": ["dev"]}, "params"),
        ({"name": "no spaces", "strategy": "ordered"}, "name"),
    ],
    ids=[
        "unregistered-strategy",
        "missing-strategy",
        "order-string",
        "order-numbers",
        "unknown-param",
        "params-list",
        "bad-name",
    ],
)
def test_invalid_policy_is_400_naming_the_field(staff_api, body, field):
    resp = staff_api.post("/policies", body, format="json")
    assert resp.status_code == 400, resp.content
    assert field in resp.json()
    assert not RoutingPolicy.objects.exists()


def test_invalid_params_on_update_are_400_and_change_nothing(staff_api, policy):
    resp = staff_api.patch(f"/policies/{policy.pk}", {"params": {"order": "dev"}}, format="json")
    assert resp.status_code == 400
    assert "params" in resp.json()
    assert RoutingPolicy.objects.get(pk=policy.pk).params == {"order": ["dev"]}


def test_is_active_cannot_be_set_by_create_or_update(staff_api, policy):
    resp = staff_api.post("/policies", {"name": "sneaky", "strategy": "ordered", "is_active": True}, format="json")
    assert resp.status_code == 201
    sneaky = resp.json()["id"]
    staff_api.patch(f"/policies/{sneaky}", {"is_active": True}, format="json")
    assert list(RoutingPolicy.objects.filter(is_active=True).values_list("name", flat=True)) == ["default"]


def test_activate_makes_exactly_one_policy_active(staff_api, policy, alt_policy):
    resp = staff_api.post(f"/policies/{alt_policy.pk}/activate")
    assert resp.status_code == 200, resp.content
    assert resp.json()["is_active"] is True
    assert list(RoutingPolicy.objects.filter(is_active=True).values_list("name", flat=True)) == ["alt"]

    resp = staff_api.post(f"/policies/{policy.pk}/activate/")
    assert resp.status_code == 200
    assert list(RoutingPolicy.objects.filter(is_active=True).values_list("name", flat=True)) == ["default"]

    # Activating the active policy again is harmless.
    assert staff_api.post(f"/policies/{policy.pk}/activate").status_code == 200
    assert RoutingPolicy.objects.filter(is_active=True).count() == 1
    assert staff_api.get(f"/policies/{alt_policy.pk}").json()["is_active"] is False


def test_deleting_the_active_policy_is_409(staff_api, policy):
    resp = staff_api.delete(f"/policies/{policy.pk}")
    assert resp.status_code == 409
    assert "detail" in resp.json()
    assert RoutingPolicy.objects.get(pk=policy.pk).is_active


def test_a_policy_can_be_deleted_once_another_is_active(staff_api, policy, alt_policy):
    assert staff_api.post(f"/policies/{alt_policy.pk}/activate").status_code == 200
    assert staff_api.delete(f"/policies/{policy.pk}").status_code == 204
    assert list(RoutingPolicy.objects.values_list("name", flat=True)) == ["alt"]


# --- hot swap: the next job follows the registry, no restart -----------------------------------
def test_activating_a_policy_governs_the_next_job(staff_api, api, policy, alt_policy):
    before = submit(api)
    assert (before["policy"], before["backend"]) == ("default", "dev")

    assert staff_api.post(f"/policies/{alt_policy.pk}/activate").status_code == 200
    right_after = submit(api)  # no pause: the very next submission
    assert (right_after["policy"], right_after["backend"]) == ("alt", "dev2")

    assert staff_api.post(f"/policies/{policy.pk}/activate").status_code == 200
    back = submit(api)
    assert (back["policy"], back["backend"]) == ("default", "dev")

    stored = Job.objects.get(pk=right_after["id"])
    assert stored.policy_name == "alt"
    assert stored.routing["policy"] == "alt"


def test_editing_the_active_policy_governs_the_next_job(staff_api, api, policy, dev2):
    first = submit(api)
    assert first["backend"] == "dev"

    resp = staff_api.patch(f"/policies/{policy.pk}", {"params": {"order": ["dev2", "dev"]}}, format="json")
    assert resp.status_code == 200
    second = submit(api)

    assert second["backend"] == "dev2"
    assert second["policy_version"] == resp.json()["version"] > first["policy_version"]


def test_disabling_or_deleting_a_backend_governs_the_next_job(staff_api, api, policy, dev2):
    assert submit(api)["backend"] == "dev"

    assert staff_api.patch(f"/backends/{policy_backend_pk()}", {"enabled": False}, format="json").status_code == 200
    assert submit(api)["backend"] == "dev2"
    resp = api.post("/jobs", {"prompt": "hi", "backend": "dev"}, format="json")
    assert resp.status_code == 422
    assert "backend" in resp.json()

    assert staff_api.delete(f"/backends/{dev2.pk}").status_code == 204
    resp = api.post("/jobs", {"prompt": "hi"}, format="json")
    assert resp.status_code == 503
    assert "disabled" in resp.json()["detail"]

    assert staff_api.patch(f"/backends/{policy_backend_pk()}", {"enabled": True}, format="json").status_code == 200
    assert submit(api)["backend"] == "dev"


def policy_backend_pk() -> int:
    return Backend.objects.get(name="dev").pk


def test_a_registry_change_is_seen_after_redis_was_flushed(staff_api, api, policy, alt_policy, redis_db):
    assert submit(api)["policy"] == "default"
    redis_db.flushdb()  # the version key is gone; the next change must still be seen
    assert staff_api.post(f"/policies/{alt_policy.pk}/activate").status_code == 200
    assert submit(api)["policy"] == "alt"


@pytest.mark.django_db(transaction=True)
def test_draining_a_backend_through_the_api_stops_new_jobs_going_to_it(staff_api, api, policy):
    other = Backend.objects.create(name="spare", kind=BackendKind.DEV)
    r = staff_api.patch(f"/backends/{policy_backend_id()}", {"drain": True}, format="json")
    assert r.status_code == 200 and r.json()["drain"] is True
    job = api.post("/jobs", {"prompt": "hi"}, format="json").json()
    assert job["backend"] == other.name
    r = api.post("/jobs", {"prompt": "hi", "backend": "dev"}, format="json")
    assert r.status_code == 422 and "draining" in r.json()["backend"][0]


def policy_backend_id() -> int:
    return Backend.objects.get(name="dev").pk
