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


def _settings_with(**env: str) -> subprocess.CompletedProcess:
    code = "import orchestrator_site.settings as s; print(s.DEBUG, s.ALLOWED_HOSTS, s.SESSION_COOKIE_SECURE)"
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True)


def test_production_mode_requires_a_secret_key():
    proc = _settings_with(DEBUG="0")
    assert proc.returncode != 0 and "SECRET_KEY" in proc.stderr


def test_production_mode_turns_on_secure_defaults():
    proc = _settings_with(DEBUG="0", SECRET_KEY="x" * 50, ALLOWED_HOSTS="api.example")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "['api.example']", "True"]


def test_invalid_setting_fails_at_start_up_naming_the_variable():
    proc = _settings_with(MAX_CONCURRENCY="lots")
    assert proc.returncode != 0 and "MAX_CONCURRENCY" in proc.stderr
