"""Swagger UI and Redoc render the API in a real browser under their Content-Security-Policy,
with nothing fetched from another site, and Swagger UI's "Try it out" calls the API.

Redoc's bundle asks for its "API docs by Redocly" logo at cdn.redoc.ly (drf-spectacular-sidecar
issue #11); the page's CSP refuses it, so the request never leaves the browser, and Redoc hides the
image. A foreign request is allowed only so: blocked by the CSP.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.browser.conftest import expect, save_screenshot

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

RENDER_TIMEOUT_MS = 30_000


def check_nothing_left_the_browser(seen: dict[str, list[str]]) -> None:
    sent = [url for url in seen["foreign"] if f"{url} csp" not in seen["failed"]]
    assert not sent, f"requests to other sites: {sent}"
    errors = [
        e for e in seen["errors"] if not any(url in e and "Content Security Policy" in e for url in seen["foreign"])
    ]
    assert not errors, errors


def watch(page, base: str) -> dict[str, list[str]]:
    """What the page does that it should not: requests to other sites, console errors (CSP violations are)."""
    seen: dict[str, list[str]] = {"foreign": [], "errors": [], "failed": []}
    own = urlsplit(base).netloc
    page.on(
        "request",
        lambda r: seen["foreign"].append(r.url) if urlsplit(r.url).netloc not in (own, "") else None,
    )
    page.on("requestfailed", lambda r: seen["failed"].append(f"{r.url} {r.failure}"))
    page.on("console", lambda m: seen["errors"].append(f"{m.text} {m.location}") if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    return seen


def test_swagger_ui_renders_the_schema_and_tries_a_call_with_no_foreign_request(page, web, operator):
    seen = watch(page, web)
    response = page.goto(f"{web}/api/docs")
    assert response.ok and "script-src 'self'" in response.headers["content-security-policy"]
    expect(page.locator(".information-container .title")).to_contain_text("LLM Orchestrator API")
    submit = page.locator("#operations-jobs-jobs_create")
    expect(submit).to_be_visible()

    # Authorize with a token, then "Try it out" on GET /jobs: the browser calls the API itself.
    page.get_by_role("button", name="Authorize").first.click()
    bearer = page.locator(".modal-ux .auth-container").filter(has=page.locator("#auth-bearer-value"))
    bearer.locator("#auth-bearer-value").fill(operator.token)
    bearer.get_by_role("button", name="Apply credentials").click()
    expect(page.locator(".modal-ux").get_by_role("heading", name="Authorized").first).to_be_visible()
    page.locator(".modal-ux .btn-done").first.click()
    listing = page.locator("#operations-jobs-jobs_list")
    listing.locator(".opblock-summary").click()
    listing.get_by_role("button", name="Try it out").click()
    listing.get_by_role("button", name="Execute").click()
    expect(listing.locator(".live-responses-table tbody .response-col_status").first).to_contain_text("200")
    save_screenshot(page, "api-docs-swagger")
    check_nothing_left_the_browser(seen)


def test_redoc_renders_the_schema_with_no_foreign_request(page, web):
    seen = watch(page, web)
    response = page.goto(f"{web}/api/redoc")
    assert response.ok and "script-src 'self'" in response.headers["content-security-policy"]
    # Redoc renders the whole schema before it shows anything: slow on a loaded machine.
    expect(page.get_by_role("heading", name="LLM Orchestrator API")).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    expect(page.get_by_role("heading", name="Submit a job")).to_be_visible()
    check_nothing_left_the_browser(seen)
