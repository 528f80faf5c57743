"""Outbound requests to backends: no redirect is followed, no foreign answer is shown, no unsafe URL is
called, and an API key never appears in an error or a log line, whatever its characters or encoding."""

from __future__ import annotations

import json
import logging
from urllib.parse import quote, quote_plus

import pytest
from django.contrib.messages import get_messages

from jobs.models import Job, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import run_worker_burst
from tests.factories import ask
from tests.fakes.ollama_server import OllamaFake
from tests.fakes.openai_server import OpenAIFake
from tests.fakes.redirect_server import (
    BANNER_SECRET,
    INTERNAL_SECRET,
    REDIRECT_BODY,
    BannerServer,
    InternalServiceFake,
    RedirectFake,
)
from workers.backends.base import BackendConfig, BackendError
from workers.backends.health import probe
from workers.backends.ollama import OllamaAdapter
from workers.backends.openai import OpenAIAdapter
from workers.backends.outbound import scrub

ADAPTERS = {"openai": OpenAIAdapter, "ollama": OllamaAdapter}
# A key with a newline (h11 quotes an illegal header value back as escaped bytes) and characters that
# JSON, repr and URL encoding each write differently. Both halves hold a marker no error may show.
NEWLINE_KEY = 'sk-LEAKA-0123456789\nLEAKB-"odd"\\chars%2F/+&=?'
# Printable, so it is really sent; a careless server echoes it back in its 401.
ODD_KEY = 'sk-LEAKC "odd" \\chars %2F/+&=?'
MARKERS = ("LEAKA", "LEAKB", "LEAKC")


def forms(key: str) -> list[str]:
    """Every way a key can be written out (computed here, not by the code under test)."""
    return [
        key,
        repr(key)[1:-1],
        repr(key.encode())[2:-1],
        json.dumps(key)[1:-1],
        quote(key, safe=""),
        quote_plus(key),
        *key.split("\n"),
    ]


def assert_no_key(text: str) -> None:
    for marker in MARKERS:
        assert marker not in text, f"a key leaked: {text!r}"
    for key in (NEWLINE_KEY, ODD_KEY):
        for form in forms(key):
            assert form not in text, f"a key leaked as {form!r}: {text!r}"


def config(kind: str, base_url: str, **kw) -> BackendConfig:
    model = "gpt-test" if kind == "openai" else "llama3.2"
    return BackendConfig(**{"name": kind, "kind": kind, "base_url": base_url, "model": model, "timeout_s": 5.0, **kw})


def all_record_text(records: list[logging.LogRecord]) -> str:
    parts = []
    for record in records:
        parts.append(record.getMessage())
        parts.extend(str(v) for v in vars(record).values())
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


# --- redirects ----------------------------------------------------------------------------------
@pytest.fixture
def redirect_to_internal():
    """(redirecting backend URL root, the internal service it points at)."""
    with InternalServiceFake() as internal, RedirectFake(internal.url) as redirect:
        yield redirect, internal


def backend_url(kind: str, root: str) -> str:
    return f"{root}/v1" if kind == "openai" else root


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_the_probe_does_not_follow_a_redirect_and_repeats_no_body(redirect_to_internal, kind):
    redirect, internal = redirect_to_internal
    result = probe(config(kind, backend_url(kind, redirect.url)))
    assert not result.ok
    assert "HTTP 302" in result.detail and "redirect not followed" in result.detail, result.detail
    assert INTERNAL_SECRET not in repr(result) and REDIRECT_BODY not in repr(result)
    assert internal.requests == [], "the probe followed the redirect"


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_an_adapter_does_not_follow_a_redirect(redirect_to_internal, kind):
    redirect, internal = redirect_to_internal
    with pytest.raises(BackendError) as err:
        ADAPTERS[kind]().generate(config(kind, backend_url(kind, redirect.url)), ask())
    assert "HTTP 302 redirect not followed" in err.value.message and not err.value.retryable
    assert INTERNAL_SECRET not in err.value.message and REDIRECT_BODY not in err.value.message
    assert internal.requests == [], "the adapter followed the redirect"


@pytest.mark.django_db
def test_the_admins_probe_action_shows_a_summary_not_the_foreign_answer(admin_client, redirect_to_internal):
    redirect, internal = redirect_to_internal
    backend = Backend.objects.create(name="moved", kind=BackendKind.OPENAI, base_url=f"{redirect.url}/v1", model="m")
    resp = admin_client.post("/admin/routing/backend/", {"action": "probe_now", "_selected_action": [backend.pk]})
    assert resp.status_code == 302, resp.content[:500]
    shown = " ".join(str(m) for m in get_messages(resp.wsgi_request))
    assert "moved:" in shown and "HTTP 302" in shown and "redirect not followed" in shown, shown
    assert INTERNAL_SECRET not in shown and REDIRECT_BODY not in shown
    assert internal.requests == []


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_a_service_that_does_not_speak_http_is_not_quoted(kind):
    with BannerServer() as banner:
        result = probe(config(kind, backend_url(kind, banner.url)))
        with pytest.raises(BackendError) as err:
            ADAPTERS[kind]().generate(config(kind, backend_url(kind, banner.url)), ask())
    assert result.status == "down" and "not valid HTTP" in result.detail, result.detail
    assert "not valid HTTP" in err.value.message, err.value.message
    assert "OpenSSH" not in repr(result) + err.value.message
    assert BANNER_SECRET not in repr(result) + err.value.message


def test_a_healthy_probe_is_a_status_summary():
    with OpenAIFake() as fake:
        result = probe(config("openai", fake.base_url))
    assert (result.status, result.detail) == ("ok", "HTTP 200, 2 models.")


# --- base_url rules -----------------------------------------------------------------------------
REFUSED_URLS = {
    "aws-metadata": "http://169.254.169.254/latest/meta-data",
    "link-local-v4": "http://169.254.10.20:11434",
    "trailing-dot": "http://169.254.169.254./",
    "decimal-ip": "http://2852039166/",
    "hex-ip": "http://0xa9fea9fe/",
    "link-local-v6": "http://[fe80::1]:11434",
    "link-local-v6-zone": "http://[fe80::1%25eth0]:11434",
    "aws-metadata-v6": "http://[fd00:ec2::254]/",
    "v4-mapped": "http://[::ffff:169.254.169.254]/",
    "gcp-metadata-name": "http://metadata.google.internal/computeMetadata/v1",
    "user-and-password": "http://user:pw@gpu1:8000/v1",
    "token-as-user": "https://sk-token@api.example.com/v1",
}
ALLOWED_URLS = ["http://192.168.1.20:11434", "http://10.0.0.5:8000/v1", "http://ollama:11434", "http://[fd12::5]:8000"]


@pytest.mark.django_db
@pytest.mark.parametrize("url", REFUSED_URLS.values(), ids=REFUSED_URLS.keys())
def test_the_registry_api_refuses_a_link_local_metadata_or_credentialed_base_url(staff_api, url):
    resp = staff_api.post("/backends", {"name": "bad", "kind": "openai", "base_url": url}, format="json")
    assert resp.status_code == 400, resp.content
    assert "base_url" in resp.json(), resp.json()
    assert not Backend.objects.filter(name="bad").exists()


@pytest.mark.django_db
@pytest.mark.parametrize("url", ALLOWED_URLS)
def test_private_lan_addresses_stay_allowed(staff_api, url):
    resp = staff_api.post("/backends", {"name": "gpu", "kind": "openai", "base_url": url}, format="json")
    assert resp.status_code == 201, resp.content


@pytest.mark.django_db
def test_the_admin_form_refuses_credentials_in_the_url(admin_client):
    data = {
        "name": "bad",
        "kind": "openai",
        "base_url": "http://user:pw@gpu1:8000/v1",
        "max_context_tokens": 8192,
        "max_concurrency": 16,
        "weight": 1,
        "cost_input_per_1k": 0,
        "cost_output_per_1k": 0,
        "timeout_s": 60,
        "config": "{}",
        "enabled": "on",
    }
    resp = admin_client.post("/admin/routing/backend/add/", data)
    assert resp.status_code == 200
    assert "put them in the API key" in resp.content.decode()
    assert not Backend.objects.filter(name="bad").exists()


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_a_url_written_before_the_rule_is_not_called_at_run_time(kind):
    with OpenAIFake() as fake:
        root = fake.url.replace("http://", "http://user:pw@")
        with pytest.raises(BackendError) as err:
            ADAPTERS[kind]().generate(config(kind, backend_url(kind, root)), ask())
        result = probe(config(kind, backend_url(kind, root)))
        assert fake.requests == []
    assert "Refused" in err.value.message and not err.value.retryable
    assert result.status == "error" and "Not probed" in result.detail
    link_local = probe(config(kind, "http://169.254.169.254"))
    assert link_local.status == "error" and "link-local" in link_local.detail


# --- secrets in errors and logs -----------------------------------------------------------------
def test_the_scrubber_removes_every_written_form_of_a_key():
    for form in forms(NEWLINE_KEY):
        assert_no_key(scrub(f"before {form} after", NEWLINE_KEY))


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_a_key_with_a_newline_is_in_no_adapter_error_and_no_log_record(kind, caplog):
    caplog.set_level(logging.DEBUG)
    fake_cls = OpenAIFake if kind == "openai" else OllamaFake
    with fake_cls() as fake:
        base = fake.base_url if kind == "openai" else fake.url
        with pytest.raises(BackendError) as err:
            ADAPTERS[kind]().generate(config(kind, base, api_key=NEWLINE_KEY), ask())
    assert_no_key(err.value.message)
    assert_no_key(str(err.value))
    assert_no_key(all_record_text(caplog.records))


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_a_key_with_a_newline_is_not_in_the_probes_answer(kind):
    fake_cls = OpenAIFake if kind == "openai" else OllamaFake
    with fake_cls() as fake:
        base = fake.base_url if kind == "openai" else fake.url
        result = probe(config(kind, base, api_key=NEWLINE_KEY))
    assert not result.ok
    assert_no_key(repr(result))


def test_a_key_echoed_back_by_the_server_is_scrubbed():
    with OpenAIFake(api_key="the-right-key") as fake:  # answers 401 quoting the key it got
        with pytest.raises(BackendError) as err:
            OpenAIAdapter().generate(config("openai", fake.base_url, api_key=ODD_KEY), ask())
        result = probe(config("openai", fake.base_url, api_key=ODD_KEY))
        assert fake.requests and fake.last.headers["authorization"] == f"Bearer {ODD_KEY}"
    assert err.value.status == 401
    assert_no_key(err.value.message)
    assert_no_key(repr(result))


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_key_with_a_newline_reaches_no_job_error_attempt_or_worker_log(api):
    with OpenAIFake() as oa, OllamaFake() as ol:
        Backend.objects.create(name="oa", kind=BackendKind.OPENAI, base_url=oa.base_url, model="gpt-test")
        Backend.objects.create(name="ol", kind=BackendKind.OLLAMA, base_url=ol.url, model="llama3.2")
        # Keys written straight to the rows, as a form might have stored them.
        Backend.objects.update(api_key=NEWLINE_KEY)
        policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["oa", "ol"]}))
        ids = []
        for name in ("oa", "ol"):
            r = api.post("/jobs", {"prompt": "hi", "backend": name}, format="json")
            assert r.status_code == 202, r.content
            ids.append(r.json()["id"])
        proc = run_worker_burst(LOG_LEVEL="DEBUG")
    assert_no_key(proc.stdout + proc.stderr)
    for job_id in ids:
        job = Job.objects.get(pk=job_id)
        assert job.state == JobState.FAILED, (job.state, job.error)
        assert job.error and "API key" in job.error
        assert_no_key(job.error)
        for attempt in job.attempt_rows():
            assert_no_key(attempt.error or "")
        assert_no_key(api.get(f"/jobs/{job_id}").content.decode())


# --- token caps hold in the adapters too (rows written before the API's check, backend config) ---------
def test_the_openai_adapter_clamps_token_params_to_the_caps(settings):
    settings.JOB_LIMITS = {**settings.JOB_LIMITS, "max_tokens": 50, "context_tokens": 1000}
    backend_params = {"params": {"max_completion_tokens": 10**6}}
    with OpenAIFake() as fake:
        OpenAIAdapter().generate(
            config("openai", fake.base_url, config=backend_params), ask(params={"max_tokens": 10**9, "n_ctx": 10**9})
        )
        sent = fake.last.body
    assert (sent["max_tokens"], sent["max_completion_tokens"], sent["n_ctx"]) == (50, 50, 1000)


def test_the_ollama_adapter_clamps_num_predict_and_num_ctx_to_the_caps(settings):
    settings.JOB_LIMITS = {**settings.JOB_LIMITS, "max_tokens": 50, "context_tokens": 1000}
    with OllamaFake() as fake:
        OllamaAdapter().generate(
            config("ollama", fake.url, config={"options": {"num_ctx": 10**7}}),
            ask(params={"options": {"num_predict": -1}}),
        )
        options = fake.last.body["options"]
    assert (options["num_predict"], options["num_ctx"]) == (50, 1000)
