"""The OpenAPI schema tells the truth about every operation's failures.

The schema validates with no warning (``manage.py spectacular --validate --fail-on-warn``). Then every
operation it lists is called in each way any request can fail: no credentials, a bad token, a disabled
tenant's key, an Accept it cannot answer, an object that does not exist, an unknown body field,
malformed JSON, a body that is not JSON, a body too large (for a multipart upload: an unknown or missing
form field, no boundary, a field, a file or a Content-Length too large), Redis down, the database down. Each answer
must be a status the schema documents for that operation, with a body its schema for that status
accepts, and the status the failure calls for. Nothing is faked: the answers come from the real
views, the real error mapper and, for the outages, a process whose Redis or database is not there.
``tests/test_api_fuzz.py`` holds the schema's success answers to the same standard.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import jsonschema
import pytest
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from rest_framework.authtoken.models import Token

from batches.models import Batch, File, FilePurpose, files_storage
from jobs.models import Job
from orchestrator_site import auth
from orchestrator_site.relaying import TICKET_HEADER
from tenants import identity
from tenants.models import ApiKey, Membership, Tenant
from tests.conftest import ROOT, process_env
from tests.factories import make_job
from webhooks import services as webhook_services

MISSING = "999999999"  # an id no object has (and, for a job, not even a UUID)
WORLD_FILE = "file-000000000000000000000001"  # the world's batch input file (a body names it)
# A body each creating operation accepts: the outage and limit probes need one that gets that far.
VALID_BODIES = {
    "/jobs/": {"prompt": "hi"},
    "/v1/chat/completions/": {"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/batches/": {
        "input_file_id": WORLD_FILE,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"k": "v"},
        "priority": "low",
    },
}
# The operations that submit jobs under a tenant's limits at once (a batch's lines are admitted by
# its worker, apart from max_queued: docs/batches.md).
LIMITED = ("/jobs/", "/v1/chat/completions/")


@pytest.fixture(autouse=True)
def empty_caches():
    auth.forget_all()
    identity.forget()
    yield
    auth.forget_all()
    identity.forget()


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """The schema as /api/schema serves it, as plain JSON."""
    return json.loads(json.dumps(SchemaGenerator().get_schema(request=None, public=True)))


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, op)
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def has_json_body(op: dict[str, Any]) -> bool:
    return "application/json" in op.get("requestBody", {}).get("content", {})


def has_multipart_body(op: dict[str, Any]) -> bool:
    return "multipart/form-data" in op.get("requestBody", {}).get("content", {})


def needs_auth(op: dict[str, Any]) -> bool:
    return {} not in op.get("security", [{}])


# --- checking an answer against the schema -------------------------------------------------
def _json_schema(node: Any, components: dict[str, Any]) -> Any:
    """An OpenAPI 3.0 schema as plain JSON Schema: references inlined, ``nullable`` as a type."""
    if isinstance(node, list):
        return [_json_schema(n, components) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _json_schema(components[node["$ref"].rsplit("/", 1)[-1]], components)
    out = {k: _json_schema(v, components) for k, v in node.items() if k not in ("nullable", "readOnly", "writeOnly")}
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


def check_documented(schema: dict[str, Any], method: str, path: str, response: Any, why: str) -> None:
    """The answer's status is documented for the operation, and its JSON body fits that status's schema."""
    op = schema["paths"][path][method]
    code = str(response.status_code)
    where = f"{method.upper()} {path} ({why}): {code}"
    assert code in op["responses"], f"{where} is not documented (documented: {sorted(op['responses'])})"
    content = op["responses"][code].get("content", {})
    if response.get("Content-Type", "").startswith("application/json") and "application/json" in content:
        body = json.loads(response.content)
        body_schema = _json_schema(content["application/json"]["schema"], schema["components"]["schemas"])
        errors = [e.message for e in jsonschema.Draft4Validator(body_schema).iter_errors(body)]
        assert not errors, f"{where}: body {body} does not fit its schema: {errors}"
    if code in ("429", "503"):
        assert "Retry-After" in op["responses"][code].get("headers", {}), f"{where}: Retry-After is not documented"


# --- the objects the paths name ------------------------------------------------------------
@pytest.fixture
def world(db, staff, policy, dev_backend) -> dict[str, str]:
    """One object of every kind a path names, owned by or visible to ``staff``; the values to put in paths."""
    tenant = Tenant.objects.create(name="acme")
    key, _ = ApiKey.issue(tenant, "ci")
    Membership.objects.create(tenant=tenant, user=staff)
    job = make_job(dev_backend, created_by=staff)
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
    blob = files_storage().save(f"{WORLD_FILE}.jsonl", ContentFile(line))
    file = File.objects.create(
        id=WORLD_FILE, purpose=FilePurpose.BATCH, filename="in.jsonl", bytes=len(line), blob=blob, created_by=staff
    )
    batch = Batch.objects.create(
        input_file=file, created_by=staff, expires_at=timezone.now() + timedelta(hours=24), total=1
    )
    hook = webhook_services.create(owner=staff, url="https://93.184.215.14/h", events=["job.failed"], source="shell")
    return {
        "webhook_id": str(hook.pk),
        "/backends/": str(dev_backend.pk),
        "/policies/": str(policy.pk),
        "/tenants/": str(tenant.pk),
        "key_id": str(key.pk),
        "member": staff.username,
        "job_id": str(job.pk),
        "model": "dev",
        "file_id": file.pk,
        "batch_id": batch.pk,
    }


def fill(path: str, ids: dict[str, str] | None) -> str:
    """The path with each parameter set to the world's object, or to an id that does not exist."""
    out = []
    for part in path.split("/"):
        if part.startswith("{"):
            name = part[1:-1]
            kind = "/" + "/".join(out[1:]) + "/" if name == "id" else name
            # A kind the world has no object of (a new endpoint's) gets a missing id: add it to `world`.
            value = MISSING if ids is None else ids.get(kind, MISSING)
            part = value
        out.append(part)
    return "/".join(out)


def client_with(authorization: str | None = None, **headers: str) -> Client:
    extra = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
    extra.update({f"HTTP_{k.upper().replace('-', '_')}": v for k, v in headers.items()})
    return Client(**extra)


def call(client: Client, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
    if body is None:
        return getattr(client, method)(path)
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return getattr(client, method)(path, data=data, content_type=content_type)


def names(body: Any, field: str) -> bool:
    """Whether an error body (ours or OpenAI's) names ``field``."""
    return field in body or field in str((body.get("error") or {}).get("param") or "")


# --- the schema itself -------------------------------------------------------------------------
def test_the_schema_validates_with_no_warning(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yml"))
    assert (tmp_path / "schema.yml").stat().st_size > 10_000


def test_every_request_body_is_documented_closed(schema):
    open_bodies = []
    for method, path, op in operations(schema):
        for media_type, content in op.get("requestBody", {}).get("content", {}).items():
            body = _json_schema(content["schema"], schema["components"]["schemas"])
            if body.get("additionalProperties") is not False:
                open_bodies.append(f"{method.upper()} {path} ({media_type})")
    assert not open_bodies, f"request bodies not documented as refusing unknown fields: {open_bodies}"


def test_one_error_body_outside_v1_and_openais_inside(schema):
    for method, path, op in operations(schema):
        expected = "OpenAIError" if path.startswith("/v1/") else "Error"
        for code, response in op["responses"].items():
            if code >= "400":
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith(f"/{expected}"), f"{method.upper()} {path} {code}: {ref}"


# --- each failure, on every operation ---------------------------------------------------------
def test_credentials_failures_are_documented_401_and_403(schema, world):
    tenant = Tenant.objects.create(name="off", enabled=False)
    _, disabled_key = ApiKey.issue(tenant, "ci")
    for method, path, op in operations(schema):
        url = fill(path, world)
        if method != "delete" and needs_auth(op):
            r = call(client_with(), method, url)
            check_documented(schema, method, path, r, "no credentials")
            assert r.status_code == 401, (path, r.content)
        r = call(client_with("Token not-a-token"), method, url)
        check_documented(schema, method, path, r, "an unknown token")
        assert r.status_code == 401, (path, r.content)
        r = call(client_with(f"Bearer {disabled_key}"), method, url)
        check_documented(schema, method, path, r, "a disabled tenant's key")
        assert r.status_code == 403, (path, r.content)


def test_an_accept_header_no_renderer_answers_is_a_documented_406(schema, world, staff):
    client = client_with(f"Token {Token.objects.create(user=staff).key}", Accept="application/xml")
    for method, path, _ in operations(schema):
        r = call(client, method, fill(path, world))
        check_documented(schema, method, path, r, "Accept: application/xml")
        assert r.status_code == 406, (path, r.content)


def test_an_object_that_does_not_exist_is_a_documented_404(schema, world, staff):
    client = client_with(f"Token {Token.objects.create(user=staff).key}")
    for method, path, op in operations(schema):
        if "{" not in path:
            continue
        r = call(client, method, fill(path, None), {} if has_json_body(op) else None)
        check_documented(schema, method, path, r, "a missing object")
        assert r.status_code == 404, (path, r.content)


def test_bad_bodies_are_documented_400_415_and_413(schema, world, staff, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    client = client_with(f"Token {Token.objects.create(user=staff).key}")
    for method, path, op in operations(schema):
        if not has_json_body(op):
            continue
        url = fill(path, world)
        r = call(client, method, url, {**VALID_BODIES.get(path, {}), "zz_unknown_field": 1})
        check_documented(schema, method, path, r, "an unknown field")
        assert r.status_code == 400 and names(r.json(), "zz_unknown_field"), (path, r.content)
        r = call(client, method, url, '{"name": ')
        check_documented(schema, method, path, r, "malformed JSON")
        assert r.status_code == 400, (path, r.content)
        r = call(client, method, url, "name=x", content_type="text/plain")
        check_documented(schema, method, path, r, "a text/plain body")
        assert r.status_code == 415, (path, r.content)
        r = call(client, method, url, {"prompt": "x" * 8192})
        check_documented(schema, method, path, r, "a body over MAX_REQUEST_BYTES")
        assert r.status_code == 413, (path, r.content)


def upload(client: Client, url: str, content: bytes = b'{"custom_id": "a"}\n', **fields: Any) -> Any:
    """A multipart upload as the SDK sends one: a file and the form's other fields."""
    return client.post(url, {"file": ContentFile(content, name="in.jsonl"), **fields})


def test_bad_uploads_are_documented_400_415_and_413(schema, world, staff, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    settings.FILES_MAX_BYTES = 2048
    client = client_with(f"Token {Token.objects.create(user=staff).key}")
    uploads = [(m, p) for m, p, op in operations(schema) if has_multipart_body(op)]
    assert uploads, "no operation takes a multipart body"
    for method, path in uploads:
        url = fill(path, world)
        r = upload(client, url, purpose="batch")
        check_documented(schema, method, path, r, "a valid upload")
        assert r.status_code == 200, (path, r.content)
        r = upload(client, url, purpose="batch", zz_unknown_field="1")
        check_documented(schema, method, path, r, "an unknown form field")
        assert r.status_code == 400 and names(r.json(), "zz_unknown_field"), (path, r.content)
        r = upload(client, url)
        check_documented(schema, method, path, r, "a missing form field")
        assert r.status_code == 400 and names(r.json(), "purpose"), (path, r.content)
        r = client.post(url, {"purpose": "batch"})
        check_documented(schema, method, path, r, "no file")
        assert r.status_code == 400 and names(r.json(), "file"), (path, r.content)
        r = call(client, method, url, b"--nope\r\ngarbage", content_type="multipart/form-data")
        check_documented(schema, method, path, r, "multipart without a boundary")
        assert r.status_code == 400, (path, r.content)
        for content_type in ("text/plain", "application/json"):
            r = call(client, method, url, '{"purpose": "batch"}', content_type=content_type)
            check_documented(schema, method, path, r, f"a {content_type} body")
            assert r.status_code == 415, (path, content_type, r.content)
        r = upload(client, url, purpose="batch" + "x" * 8192)
        check_documented(schema, method, path, r, "a form field over MAX_REQUEST_BYTES")
        assert r.status_code == 413, (path, r.content)
        r = upload(client, url, b"x" * 4096, purpose="batch")
        check_documented(schema, method, path, r, "a file over FILES_MAX_BYTES")
        assert r.status_code == 413, (path, r.content)
        r = upload(client, url, b"x" * (128 * 1024), purpose="batch")
        check_documented(schema, method, path, r, "a body over FILES_MAX_BYTES by its Content-Length")
        assert r.status_code == 413, (path, r.content)


def test_a_tenant_over_its_limit_is_a_documented_429_with_retry_after(schema, world, policy, django_user_model):
    tenant = Tenant.objects.create(name="capped", max_queued=0)
    _, key = ApiKey.issue(tenant, "ci")
    client = client_with(f"Bearer {key}")
    for path in LIMITED:
        r = call(client, "post", path, VALID_BODIES[path])
        check_documented(schema, "post", path, r, "max_queued reached")
        assert r.status_code == 429 and int(r["Retry-After"]) >= 1, (path, r.content)
    assert not Job.objects.filter(tenant=tenant).exists()


# --- the outages, in a process whose Redis or database is not there -------------------------
PROBE = """
import django, json, sys
django.setup()
from django.test import Client
from django.utils import timezone
calls, token = json.loads(sys.argv[1]), sys.argv[2]
c = Client(HTTP_AUTHORIZATION=f"Token {token}")
out = []
for method, path, body in calls:
    if body is None:
        r = getattr(c, method)(path)
    else:
        r = getattr(c, method)(path, data=json.dumps(body), content_type="application/json")
    content = b"".join(r.streaming_content) if r.streaming else r.content  # a file's bytes are streamed
    out.append([r.status_code, dict(r.headers), content.decode()])
print(json.dumps(out))
"""


class _Answer:
    """A probe's answer, read as the checks read a test client's response."""

    def __init__(self, status: int, headers: dict[str, str], content: str) -> None:
        self.status_code, self.headers, self.content = status, headers, content.encode()

    def get(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)


def probe_without(schema: dict[str, Any], world: dict[str, str], token: str, **env: str) -> list[tuple]:
    """Call every operation (deletes last, the deepest first) in a process with ``env``; (method, path, answer)."""
    ops = sorted(operations(schema), key=lambda o: (o[0] == "delete", -len(o[1])))
    calls = [
        (method, fill(path, world), (VALID_BODIES.get(path, {}) if has_json_body(op) else None))
        for method, path, op in ops
    ]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(calls), token],
        cwd=ROOT,
        env=process_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    return [(method, path, _Answer(*answer)) for (method, path, _), answer in zip(ops, answers, strict=True)]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("down", "env"),
    [
        ("Redis", {"REDIS_URL": "redis://127.0.0.1:1/0"}),  # nothing listens on port 1
        ("the database", {"DATABASE_URL": "postgres://postgres@127.0.0.1:1/none"}),
    ],
)
def test_an_outage_answers_only_documented_statuses_and_bodies(schema, world, staff, down, env):
    token = Token.objects.create(user=staff).key
    answers = probe_without(schema, world, token, **env)
    unavailable = set()
    for method, path, answer in answers:
        if answer.get(TICKET_HEADER):
            continue  # the ASGI relay answers this one (tests/test_api_fuzz.py runs it)
        assert answer.status_code < 500 or answer.status_code == 503, (method, path, answer.content[:500])
        check_documented(schema, method, path, answer, f"{down} down")
        if answer.status_code == 503:
            assert answer.get("Retry-After"), (method, path)
            unavailable.add(f"{method.upper()} {path}")
    assert {"POST /jobs/", "POST /v1/chat/completions/"} <= unavailable, unavailable
    if down == "Redis":
        # A batch is its row: committed, it is answered (the reconciler starts it), not a 503 a retry duplicates.
        (created,) = [a for m, p, a in answers if (m, p) == ("post", "/v1/batches/")]
        assert created.status_code == 200, created.content
        assert Batch.objects.filter(pk=json.loads(created.content)["id"], status="validating").exists()
    if down == "the database":
        assert len(unavailable) == len(answers), sorted({f"{m.upper()} {p}" for m, p, _ in answers} - unavailable)


def test_a_job_id_that_is_a_uuid_but_no_job_is_404_too(schema, world, staff):
    client = client_with(f"Token {Token.objects.create(user=staff).key}")
    for method, path, _ in operations(schema):
        if "{job_id}" in path:
            r = call(client, method, path.replace("{job_id}", str(uuid.uuid4())))
            check_documented(schema, method, path, r, "an unknown job")
            assert r.status_code == 404, (path, r.content)
