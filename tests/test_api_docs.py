"""Swagger UI (/api/docs) and Redoc (/api/redoc) come from this site's own files, under a CSP of their own.

What a browser makes of them is in tests/browser/test_api_docs.py; DEBUG off (collected, hashed
static files) in tests/test_production_image.py.
"""

from __future__ import annotations

import re

import pytest

from orchestrator_site.api_docs import DOCS_CSP

PAGES = ["/api/docs", "/api/redoc", "/api/docs/redoc"]
_REFERENCE = re.compile(r'(?:src|href|spec-url)="([^"]*)"')
_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.IGNORECASE)


@pytest.mark.parametrize("page", PAGES)
def test_a_docs_page_loads_only_files_of_this_site_and_no_inline_script(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r["Content-Type"].startswith("text/html")
    assert r["Content-Security-Policy"] == DOCS_CSP
    html = r.content.decode()
    assert not _INLINE_SCRIPT.search(html), "an inline <script> (the CSP allows none)"
    assert "http://" not in html and "https://" not in html, "a reference to another site"
    references = _REFERENCE.findall(html)
    assert references
    for url in references:
        assert url.startswith("/") and not url.startswith("//"), url
        answer = client.get(url)
        assert answer.status_code == 200, url
        if ".js" in url or "script" in url:
            assert "javascript" in answer["Content-Type"], (url, answer["Content-Type"])


def test_the_swagger_start_up_script_is_a_file_naming_the_schema(client):
    r = client.get("/api/docs?script=")
    assert r.status_code == 200 and "javascript" in r["Content-Type"]
    assert '"/api/schema"' in r.content.decode()
    assert '"validatorUrl": null' in r.content.decode()  # no badge fetched from validator.swagger.io


def test_the_csp_of_the_docs_pages_is_theirs_alone(client, admin_client):
    assert "script-src 'self';" in DOCS_CSP and "unsafe-eval" not in DOCS_CSP
    assert "Content-Security-Policy" not in client.get("/api/schema")
    assert "Content-Security-Policy" not in admin_client.get("/admin/")


def test_the_api_root_names_the_docs(api):
    body = api.get("/").json()
    assert body["docs"].endswith("/api/docs") and body["redoc"].endswith("/api/redoc")
