"""Settings come from the environment, with safe defaults and loud failures on nonsense."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from orchestrator_site.env import env_bool, env_int, env_list, env_secret
from tests.conftest import ROOT


def test_env_bool_accepts_common_spellings(monkeypatch):
    for raw, expected in [("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False), ("", False)]:
        monkeypatch.setenv("X_FLAG", raw)
        assert env_bool("X_FLAG") is expected
    monkeypatch.delenv("X_FLAG")
    assert env_bool("X_FLAG", True) is True


def test_env_bool_rejects_nonsense(monkeypatch):
    monkeypatch.setenv("X_FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="X_FLAG"):
        env_bool("X_FLAG")


def test_env_int_checks_type_and_bounds(monkeypatch):
    monkeypatch.setenv("X_N", "12")
    assert env_int("X_N", 1, minimum=1, maximum=100) == 12
    monkeypatch.setenv("X_N", "twelve")
    with pytest.raises(ImproperlyConfigured, match="X_N"):
        env_int("X_N", 1)
    monkeypatch.setenv("X_N", "0")
    with pytest.raises(ImproperlyConfigured, match="minimum"):
        env_int("X_N", 1, minimum=1)


def test_env_list_and_secret_file(monkeypatch, tmp_path):
    monkeypatch.setenv("X_HOSTS", "a.example, b.example,,")
    assert env_list("X_HOSTS", []) == ["a.example", "b.example"]
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("X_KEY_FILE", str(secret))
    assert env_secret("X_KEY") == "s3cret"
    monkeypatch.setenv("X_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ImproperlyConfigured, match="X_KEY_FILE"):
        env_secret("X_KEY")


def _settings_with(*names: str, **env: str) -> subprocess.CompletedProcess:
    """Import the real settings in a clean environment (only ``env``); print ``names``, one per line."""
    names = names or ("DEBUG", "ALLOWED_HOSTS", "SESSION_COOKIE_SECURE")
    prints = "".join(f"print(repr(getattr(s, {n!r}, None)))\n" for n in names)
    code = "import orchestrator_site.settings as s\n" + prints
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True)


def test_debug_is_off_unless_set_so_a_secret_key_is_required():
    proc = _settings_with()
    assert proc.returncode != 0
    assert "ImproperlyConfigured" in proc.stderr and "SECRET_KEY" in proc.stderr


def test_debug_on_runs_with_a_dev_key():
    proc = _settings_with("DEBUG", "SECRET_KEY", DEBUG="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "True" and "dev-only" in proc.stdout


def test_secret_key_can_come_from_a_file(tmp_path):
    key_file = tmp_path / "secret_key"
    key_file.write_text("k" * 50 + "\n")
    proc = _settings_with("DEBUG", "SECRET_KEY", SECRET_KEY_FILE=str(key_file))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["False", repr("k" * 50)]


def test_production_mode_serves_localhost_only_and_plain_http_by_default():
    names = ("DEBUG", "ALLOWED_HOSTS", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SECURE_PROXY_SSL_HEADER")
    proc = _settings_with(*names, SECRET_KEY="x" * 50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["False", "['localhost', '127.0.0.1', '[::1]']", "False", "False", "None"]
    proc = _settings_with("ALLOWED_HOSTS", SECRET_KEY="x" * 50, ALLOWED_HOSTS="api.example")
    assert proc.stdout.splitlines() == ["['api.example']"]


def test_https_flags_are_set_from_the_environment():
    names = ("SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE", "SECURE_PROXY_SSL_HEADER", "SECURE_HSTS_SECONDS")
    env = {"SESSION_COOKIE_SECURE": "1", "CSRF_COOKIE_SECURE": "1", "SECURE_PROXY_SSL_HEADER": "1"}
    proc = _settings_with(*names, SECRET_KEY="x" * 50, SECURE_HSTS_SECONDS="3600", **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["True", "True", "('HTTP_X_FORWARDED_PROTO', 'https')", "3600"]


def test_login_throttling_is_configured_from_the_environment():
    names = ("AXES_FAILURE_LIMIT", "AXES_COOLOFF_TIME", "TRUSTED_PROXY_COUNT")
    env = {"LOGIN_FAILURE_LIMIT": "3", "LOGIN_COOLOFF_MINUTES": "2", "TRUSTED_PROXY_COUNT": "1"}
    proc = _settings_with(*names, SECRET_KEY="x" * 50, **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["3", "datetime.timedelta(seconds=120)", "1"]
    proc = _settings_with(SECRET_KEY="x" * 50, LOGIN_FAILURE_LIMIT="0")
    assert proc.returncode != 0 and "LOGIN_FAILURE_LIMIT" in proc.stderr


def test_invalid_setting_fails_at_start_up_naming_the_variable():
    proc = _settings_with(SECRET_KEY="x" * 50, MAX_CONCURRENCY="lots")
    assert proc.returncode != 0 and "MAX_CONCURRENCY" in proc.stderr
