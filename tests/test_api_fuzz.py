"""Fuzz the live API with schemathesis against its own OpenAPI schema: no 5xx, every answer as documented.

A real gunicorn serves the test database; schemathesis generates valid and invalid requests for
every operation from ``/api/schema`` (bounded examples, a fixed seed, so a run is repeatable and
takes about a minute) and checks each answer against the schema. Two identities: a client (every
operation; registry writes and every tenant call must be refused as documented) and staff (the
registry, policy and tenant calls, stateful sequences included). ``FUZZ_EXAMPLES`` / ``FUZZ_SEED``
widen or vary a run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rest_framework.authtoken.models import Token

from routing.models import Backend
from tests.conftest import ROOT, free_port, process_env

pytestmark = pytest.mark.django_db(transaction=True)

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
EXAMPLES = os.environ.get("FUZZ_EXAMPLES", "12")
SEED = os.environ.get("FUZZ_SEED", "20261204")
# Every check schemathesis has runs; the conformance checks are named so that no default can turn them
# off: an answer whose status, body, content type or headers the schema does not document fails the run.
# All but:
# - positive_data_acceptance: the server enforces rules JSON Schema cannot state (an image must be a
#   real PNG/JPEG/… in base64, names are unique, an openai backend needs a base URL), so schema-valid
#   bodies are legitimately refused with a 400 that names the field.
CONFIG = """
checks.status_code_conformance.enabled = true
checks.response_schema_conformance.enabled = true
checks.content_type_conformance.enabled = true
checks.response_headers_conformance.enabled = true
checks.negative_data_rejection.enabled = true
checks.positive_data_acceptance.enabled = false
"""


def fuzz(base: str, token: str, tmp_path: Path, name: str, *args: str) -> dict:
    """One schemathesis run; returns {"rc", "output", "requests", "statuses"} (statuses: code -> count)."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    har = tmp_path / f"{name}.har"
    cmd = [
        str(SCHEMATHESIS),
        "--config-file",
        str(config),
        "run",
        f"{base}/api/schema",
        "-H",
        f"Authorization: Token {token}",
        "--max-examples",
        EXAMPLES,
        "--seed",
        SEED,
        "--workers",
        "1",
        "--no-shrink",
        "--request-timeout",
        "30",
        "--report",
        "har",
        "--report-har-path",
        str(har),
        "--output-truncate",
        "true",
        *args,
    ]
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses: dict[int, int] = {}
    for entry in entries:
        code = entry["response"]["status"]
        statuses[code] = statuses.get(code, 0) + 1
    return {"rc": proc.returncode, "output": log.read_text(), "requests": len(entries), "statuses": statuses}


@pytest.fixture
def server(transactional_db, tmp_path) -> Iterator[str]:
    """gunicorn on the test database with production answers (no debug pages), its log in a file:
    a fuzz run makes thousands of log lines, which would fill an unread pipe and stall the server."""
    port = free_port()
    env = process_env(DEBUG="0", SECRET_KEY="fuzz-test-secret-key-not-for-production-0123456789", RESULT_WAIT_MAX_S="2")
    cmd = [sys.executable, "-m", "gunicorn", "orchestrator_site.asgi:application", "-k", "uvicorn_worker.UvicornWorker"]
    cmd += ["-w", "2", "-b", f"127.0.0.1:{port}"]
    with open(tmp_path / "gunicorn.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_fuzzed_api_answers_no_5xx_and_only_what_its_schema_documents(
    server, policy, user, staff, tmp_path, worker_process
):
    # Room for any valid job: one too big for every context window is a designed 503 with Retry-After
    # (an operator may add a bigger backend; tests/test_api_validation.py), not a fault to fuzz for.
    # The same for a job asking for a multimodal backend.
    Backend.objects.filter(name="dev").update(max_context_tokens=1_000_000, supports_multimodal=True)
    worker_process()  # completions, streams and ?wait= end when their (dev, 0 ms) jobs do
    base = server
    runs = {
        "client": fuzz(base, Token.objects.create(user=user).key, tmp_path, "client"),
        "staff": fuzz(
            base,
            Token.objects.create(user=staff).key,
            tmp_path,
            "staff",
            "--include-path-regex",
            "^/(backends|policies|tenants)",
        ),
    }
    for name, run in runs.items():
        print(f"fuzz {name}: {run['requests']} requests, statuses {dict(sorted(run['statuses'].items()))}")
    for name, run in runs.items():
        server_errors = {code: n for code, n in run["statuses"].items() if code >= 500}
        assert run["requests"] > 100, f"{name}: too few requests:\n{run['output'][-3000:]}"
        assert not server_errors, f"{name}: 5xx answers {server_errors}:\n{run['output'][-6000:]}"
        assert run["rc"] == 0, f"{name}: schemathesis found failures:\n{run['output'][-8000:]}"
