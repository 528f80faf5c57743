"""The production image serves its pages: static files collected exactly as compose/app.Dockerfile does,
then the site run as its CMD runs it (gunicorn with compose/gunicorn.conf.py), DEBUG off, with the
manifest storage. No Docker engine is needed: the Dockerfile's own ENV and RUN line are executed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from tests.conftest import ROOT, database_url, free_port

DOCKERFILE = ROOT / "compose" / "app.Dockerfile"
VENV_BIN = str(Path(sys.executable).parent)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.read_text().splitlines() if not ln.startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def dockerfile_env(tmp_path: Path) -> dict[str, str]:
    """The image's ENV, with its one absolute path (the metrics directory) moved under ``tmp_path``."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prometheus-multiproc")  # absent, as during the build
    return env


def collectstatic_command() -> str:
    runs = [args for instruction, args in dockerfile_instructions() if instruction == "RUN" and "collectstatic" in args]
    assert len(runs) == 1, runs
    return runs[0]


def image_cmd() -> list[str]:
    cmds = [json.loads(args) for instruction, args in dockerfile_instructions() if instruction == "CMD"]
    return cmds[-1]


@pytest.fixture
def built_static(tmp_path) -> tuple[Path, dict[str, str]]:
    """Run the Dockerfile's collectstatic line in the image's environment (nothing of ours leaks in)."""
    static_root = tmp_path / "static"
    env = {
        **dockerfile_env(tmp_path),
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",  # `python` is the project's interpreter, as in the image
        "STATIC_ROOT": str(static_root),
        "VAR_DIR": str(tmp_path / "var"),
    }
    proc = subprocess.run(["sh", "-c", collectstatic_command()], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (static_root / "staticfiles.json").is_file()  # the manifest DEBUG=0 pages look names up in
    return static_root, env


@pytest.fixture
def production_site(built_static, tmp_path, transactional_db) -> Iterator[str]:
    """The image's CMD (gunicorn -c compose/gunicorn.conf.py) with DEBUG off, on the test database."""
    static_root, build_env = built_static
    port = free_port()
    env = {
        **dockerfile_env(tmp_path),
        "PATH": build_env["PATH"],
        "STATIC_ROOT": str(static_root),
        "VAR_DIR": build_env["VAR_DIR"],
        "DEBUG": "0",
        "SECRET_KEY": "production-image-test-key-" + "x" * 30,
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "WARNING",
    }
    log = (tmp_path / "web.log").open("wb")
    proc = subprocess.Popen(image_cmd(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp_path / "web.log").read_text()
            assert time.monotonic() < deadline, "gunicorn did not answer within 30 s"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def operator(transactional_db, django_user_model) -> tuple[str, str]:
    """A superuser whose password the production settings can check (they know no MD5 hasher)."""
    password = "image-op-4711"
    user = django_user_model.objects.create_superuser("imageop", password=None)
    hasher = PBKDF2PasswordHasher()
    user.password = hasher.encode(password, hasher.salt())
    user.save(update_fields=["password"])
    return user.username, password


def csrf_token(html: str) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)


def test_admin_login_and_dashboard_answer_200_with_debug_off(production_site, operator):
    base = production_site
    with httpx.Client(base_url=base, timeout=10) as client:
        r = client.get("/admin/login/")
        assert r.status_code == 200, r.text[-2000:]
        # Static links carry the manifest's hashed names, and whitenoise serves them.
        css = re.search(r'href="(/static/admin/css/base\.[0-9a-f]{12}\.css)"', r.text)
        assert css, "no hashed admin stylesheet in the login page"
        assert client.get(css.group(1)).status_code == 200

        username, password = operator
        r = client.post(
            "/admin/login/?next=/admin/dashboard/",
            data={"username": username, "password": password, "csrfmiddlewaretoken": csrf_token(r.text)},
            headers={"Referer": f"{base}/admin/login/"},
        )
        assert r.status_code == 302 and r.headers["location"] == "/admin/dashboard/", r.text[-2000:]
        r = client.get("/admin/dashboard/")
        assert r.status_code == 200, r.text[-2000:]
        assert "dash-recent" in r.text  # the dashboard itself, not a login page again
        for path in re.findall(r'(?:src|href)="(/static/[^"]+)"', r.text):
            assert client.get(path).status_code == 200, path


def test_the_dockerfile_collects_without_debug():
    # Collected with DEBUG on, the plain storage writes no manifest and every DEBUG=0 page is a 500.
    command = collectstatic_command()
    assert "DEBUG=0" in command.split() and "DEBUG=1" not in command


def test_the_api_docs_load_their_collected_files_with_debug_off(production_site):
    # Swagger UI and Redoc come from drf-spectacular-sidecar's files, collected and hashed like the admin's.
    with httpx.Client(base_url=production_site, timeout=10) as client:
        for page in ("/api/docs", "/api/redoc"):
            r = client.get(page)
            assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"], page
            files = re.findall(r'(?:src|href)="(/static/drf_spectacular_sidecar/[^"]+)"', r.text)
            assert files and all(re.search(r"\.[0-9a-f]{12}\.", f) for f in files), files
            for path in files:
                assert client.get(path).status_code == 200, path
        assert client.get("/api/docs?script=").headers["content-type"].startswith("application/javascript")
