"""Real-browser fixtures: one headless Chromium for the package, a fresh page per test, the site
served by gunicorn on the test database, and a long-running worker process.

The browser is Debian's chromium driven by Playwright (tools/ensure_browser.sh installs it for
`make test`); `playwright install` is never used. Without a Chromium the tests skip, saying so.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from rest_framework.authtoken.models import Token

from jobs.models import Job
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import ROOT, process_env

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips every test, naming what is missing
    expect = None

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 900}
ARTIFACTS = ROOT / "tests" / "artifacts"  # gitignored; screenshots of failures and of the dashboard
EXPECT_TIMEOUT_MS = 10_000


@pytest.fixture(scope="package")
def browser() -> Iterator:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CHROMIUM_PATH)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is missing: pip install -r requirements-dev.txt"
    )
    sync_api.expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    # Playwright's sync API keeps an asyncio loop running on this thread, so Django would take every
    # ORM call in these tests for one made from async code and refuse it. They are plain synchronous
    # calls made between browser steps; the flag is set for this package only and restored after it.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_api.sync_playwright() as pw:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
            try:
                yield chromium
            finally:
                chromium.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.browser_call_failed = report.failed
    return report


@pytest.fixture
def page(browser, request) -> Iterator:
    """A page in a fresh context (own cookies); on failure its screenshot and HTML go to tests/artifacts/."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    p = context.new_page()
    yield p
    if getattr(request.node, "browser_call_failed", False):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        for i, open_page in enumerate(context.pages):
            try:
                open_page.screenshot(path=ARTIFACTS / f"failed-{name}-{i}.png", full_page=True)
                (ARTIFACTS / f"failed-{name}-{i}.html").write_text(open_page.content())
            except Exception as exc:  # a crashed page must not hide the test's own failure
                print(f"could not save page {i} of {name}: {exc}")
    context.close()


@pytest.fixture
def web(gunicorn_server) -> str:
    """Base URL of the site (gunicorn, two processes) serving the test database."""
    return gunicorn_server(workers=2)


@pytest.fixture
def rq_worker(transactional_db, tmp_path) -> Iterator[subprocess.Popen]:
    """`manage.py rqworker high normal low` running for the whole test, stopped (SIGTERM) after it."""
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "rqworker", "high", "normal", "low"],
        cwd=ROOT,
        env=process_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@dataclass(frozen=True)
class Operator:
    username: str
    password: str
    token: str


@pytest.fixture
def operator(transactional_db, django_user_model) -> Operator:
    """A staff user (superuser) the browser logs in as; the token is for API calls made beside the browser.

    The password is hashed with Django's default hasher: the site runs on the production settings,
    which do not know the fast MD5 hasher tests/settings.py uses.
    """
    password = "op-secret-4711"
    hasher = PBKDF2PasswordHasher()
    user = django_user_model.objects.create_superuser("operator", password=None)
    user.password = hasher.encode(password, hasher.salt())
    user.save(update_fields=["password"])
    return Operator("operator", password, Token.objects.create(user=user).key)


@pytest.fixture
def routable(transactional_db) -> Backend:
    """One instant dev backend and an active policy that routes to it."""
    backend = Backend.objects.create(name="dev", kind=BackendKind.DEV, config={"latency_ms": 0})
    policies.activate(RoutingPolicy.objects.create(name="default", strategy="ordered", params={"order": ["dev"]}))
    return backend


# --- steps shared by the tests -------------------------------------------------------------
def log_in(page, base: str, operator: Operator) -> None:
    """The admin login form, as a person fills it."""
    page.goto(f"{base}/admin/login/")
    page.fill("#id_username", operator.username)
    page.fill("#id_password", operator.password)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{base}/admin/")


def submit_through_browsable_api(page, base: str, body: str) -> str:
    """POST /jobs/ through the browsable API's raw-data form; returns the id on the response page."""
    page.goto(f"{base}/jobs/")
    form = page.locator("#post-generic-content-form form")
    form.locator("textarea[name=_content]").fill(body)
    form.get_by_role("button", name="POST").click()
    response = page.locator(".response-info")
    expect(response).to_contain_text("HTTP 202 Accepted")
    match = re.search(r'"id":\s*"([0-9a-f-]{36})"', response.inner_text())
    assert match, f"no job id on the response page:\n{response.inner_text()}"
    return match.group(1)


def api_submit(base: str, operator: Operator, payload: dict) -> dict:
    """POST /jobs with the operator's token, beside the browser (a client program's call)."""
    r = httpx.post(f"{base}/jobs", json=payload, headers={"Authorization": f"Token {operator.token}"}, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()


def wait_for_state(job_ids: list[str], state: str, timeout: float = 20) -> None:
    """Poll the database until every job is in ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        states = dict(Job.objects.filter(pk__in=job_ids).values_list("pk", "state"))
        if len(states) == len(job_ids) and set(states.values()) == {state}:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout}s the jobs are {states}, not all {state}")
        time.sleep(0.1)


def save_screenshot(page, name: str) -> Path:
    """Full-page PNG in tests/artifacts/; also in docs/img/ (for the README) when UPDATE_SCREENSHOTS=1."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        docs = ROOT / "docs" / "img" / f"{name}.png"
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_bytes(path.read_bytes())
    return path
