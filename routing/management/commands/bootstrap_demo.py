"""Idempotent first-run set-up: a `dev` backend, an active policy, an admin user and its API token.

Used by `make run`. Safe to run again: existing records are kept; the admin's
password is generated once and kept in ``var/admin-credentials.json`` (mode 600).
"""

from __future__ import annotations

import json
import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from rest_framework.authtoken.models import Token

from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy


class Command(BaseCommand):
    help = "Seed a demo dev backend, an active routing policy, and an admin user with an API token."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default=os.environ.get("ADMIN_USERNAME", "admin"))
        parser.add_argument("--json", action="store_true", dest="as_json", help="Print the credentials as JSON.")

    def handle(self, *args, username: str, as_json: bool = False, **options) -> None:
        with transaction.atomic():
            backend, _ = Backend.objects.get_or_create(
                name="dev",
                defaults={
                    "kind": BackendKind.DEV,
                    "config": {"latency_ms": 50},
                    "max_concurrency": 64,
                    "max_context_tokens": 32768,
                },
            )
            policy, _ = RoutingPolicy.objects.get_or_create(
                name="default",
                defaults={
                    "strategy": "ordered",
                    "params": {"order": [backend.name]},
                    "description": "Seeded by bootstrap_demo: the dev backend first.",
                },
            )
            if not RoutingPolicy.objects.filter(is_active=True).exists():
                policies.activate(policy)
        user, password = self._admin(username)
        token, _ = Token.objects.get_or_create(user=user)
        creds = {"username": user.username, "password": password, "token": token.key}
        if as_json:
            self.stdout.write(json.dumps(creds))
        else:
            self.stdout.write(f"admin user: {user.username}  password: {password}  API token: {token.key}")

    def _admin(self, username: str):
        path = settings.VAR_DIR / "admin-credentials.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = {}
        if path.exists():
            stored = _loads(path.read_text())
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        password = stored.get("password") if stored.get("username") == username else None
        if user is None or password is None or not user.check_password(password):
            password = password or secrets.token_urlsafe(12)
            if user is None:
                user = User.objects.create_superuser(username=username, email="", password=password)
            else:
                user.set_password(password)
                user.is_staff = user.is_superuser = True
                user.save()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps({"username": username, "password": password}))
        return user, password


def _loads(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        return {}
