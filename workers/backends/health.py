"""Health probes per backend kind: is the server up, is our model there, what can it do?

``probe(backend)`` answers a :class:`ProbeResult` and never raises for a network failure, so a scheduler
or an admin action can call it blindly. Statuses: ``ok``; ``loading`` (up, but the model is still
loading: llama.cpp answers 503 "Loading model" meanwhile — not a reason to open a circuit for good);
``down`` (unreachable, timing out, or 5xx); ``error`` (answering, but unusable as configured: a rejected
key, our model missing).

- ollama: ``GET /api/version``, ``GET /api/tags`` (models), and ``POST /api/show`` for our model, whose
  ``capabilities`` (e.g. ``vision``) say whether it takes images: see :func:`supports_multimodal`.
- openai: ``GET {base_url}/models``; when that does not answer 200, the server root's ``/health``
  (llama.cpp, vLLM and TGI have one) tells loading from down.
- dev: always ok. Other kinds (hf_local runs inside workers) have no network probe: ``unknown``.

``detail`` is a summary we write ("HTTP 302 redirect not followed", "HTTP 200, 3 models"), never text
from the server's answer: the admin shows it, and a URL that leads somewhere unintended must not read
that place back. Redirects are not followed; a URL or key that ``outbound`` refuses is not called.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from workers.backends.base import BackendConfig
from workers.backends.outbound import header_problem, scrub, transport_summary, url_problem

DEFAULT_TIMEOUT_S = 5.0
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class ProbeResult:
    """One probe's answer; ``ok`` is True only for status ``ok``."""

    ok: bool
    status: str
    detail: str = ""
    latency_ms: int = 0
    models: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    version: str = ""


def probe(backend: BackendConfig, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProbeResult:
    """Probe ``backend`` once with a short timeout; network failures become ``down``, never exceptions."""
    started = time.monotonic()
    prober = _PROBES.get(backend.kind)
    if prober is None:
        return ProbeResult(ok=False, status="unknown", detail=f"No network probe for kind {backend.kind!r}.")
    problem = url_problem(backend.base_url) if backend.kind != "dev" else None
    if not problem and backend.api_key:
        problem = header_problem(backend.api_key)
    if problem:
        return ProbeResult(ok=False, status="error", detail=f"Not probed: {problem}")
    headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
    try:
        with httpx.Client(timeout=timeout_s, headers=headers, follow_redirects=False) as client:
            fields = prober(client, backend)
    except httpx.TimeoutException:
        fields = {"status": "down", "detail": f"No answer within {timeout_s:g}s."}
    except httpx.TransportError as exc:
        fields = {"status": "down", "detail": f"Unreachable: {transport_summary(exc)}"}
    except (ValueError, AttributeError, TypeError):  # a body that is not the protocol's JSON
        fields = {"status": "down", "detail": "Unexpected answer: not the protocol's JSON."}
    if backend.api_key and fields.get("detail"):
        fields["detail"] = scrub(fields["detail"], backend.api_key)
    status = fields.pop("status")
    latency_ms = int((time.monotonic() - started) * 1000)
    return ProbeResult(ok=status == "ok", status=status, latency_ms=latency_ms, **fields)


def supports_multimodal(backend: BackendConfig, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool | None:
    """Whether the backend's model takes images: True/False when the server says (Ollama's ``vision``
    capability), None when it cannot tell (other kinds, unreachable), so a caller never unsets the flag on a guess.
    """
    if backend.kind != "ollama" or not backend.model:
        return None
    result = probe(backend, timeout_s)
    if not result.capabilities:
        return None
    return "vision" in result.capabilities


# --- per kind ---------------------------------------------------------------------------
def _probe_dev(client: httpx.Client, backend: BackendConfig) -> dict[str, Any]:
    return {"status": "ok", "detail": "Built-in.", "models": [backend.model] if backend.model else []}


def _ollama_name(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _probe_ollama(client: httpx.Client, backend: BackendConfig) -> dict[str, Any]:
    base = backend.base_url.rstrip("/")
    r = client.get(f"{base}/api/version")
    if r.status_code != 200:
        return {"status": "down" if r.status_code >= 500 else "error", "detail": _detail(r, "/api/version")}
    version = _name(r.json().get("version", ""))
    r = client.get(f"{base}/api/tags")
    if r.status_code != 200:
        return {"status": "down" if r.status_code >= 500 else "error", "detail": _detail(r, "/api/tags")}
    models = [_name(m.get("name") or m.get("model")) for m in r.json().get("models") or []]
    out: dict[str, Any] = {"version": version, "models": models}
    if not backend.model:
        return {**out, "status": "ok", "detail": f"HTTP 200, Ollama {version}, {len(models)} models."}
    if _ollama_name(backend.model) not in {_ollama_name(m) for m in models}:
        return {**out, "status": "error", "detail": f"Model {backend.model!r} is not pulled on this server."}
    r = client.post(f"{base}/api/show", json={"model": backend.model})
    if r.status_code != 200:
        return {**out, "status": "error", "detail": _detail(r, "/api/show")}
    capabilities = [_name(c) for c in r.json().get("capabilities") or []]
    return {**out, "status": "ok", "capabilities": capabilities, "detail": f"Ollama {version}, model ready."}


def _probe_openai(client: httpx.Client, backend: BackendConfig) -> dict[str, Any]:
    base = backend.base_url.rstrip("/")
    r = client.get(f"{base}/models")
    if r.status_code == 200:
        models = [_name(m.get("id")) for m in r.json().get("data") or [] if isinstance(m, dict)]
        if backend.model and models and backend.model not in models:
            return {"status": "error", "models": models, "detail": f"Model {backend.model!r} is not served here."}
        return {"status": "ok", "models": models, "detail": f"HTTP 200, {len(models)} models."}
    if r.status_code in (401, 403):
        return {"status": "error", "detail": _detail(r, "/models")}
    if _is_loading(r):
        return {"status": "loading", "detail": f"{_detail(r, '/models')} The model is loading."}
    # No usable /models (older TGI, a gateway): the server root's /health decides.
    root = re.sub(r"/v\d+$", "", base)  # the API version segment; /health lives at the root
    h = client.get(f"{root}/health")
    if h.status_code == 200:
        return {"status": "ok", "detail": f"/health is ok; /models answered HTTP {r.status_code}."}
    if h.status_code == 503:
        loading = _is_loading(h)
        return {
            "status": "loading" if loading else "down",
            "detail": f"{_detail(h, '/health')}{' The model is loading.' if loading else ''}",
        }
    return {"status": "down" if max(r.status_code, h.status_code) >= 500 else "error", "detail": _detail(r, "/models")}


def _is_loading(r: httpx.Response) -> bool:
    return r.status_code == 503 and "loading" in r.text.lower()


def _detail(r: httpx.Response, path: str) -> str:
    """``path`` answered ``status``: our summary, never the answer's text (see the module docstring)."""
    if r.is_redirect or 300 <= r.status_code < 400:
        return f"{path} answered HTTP {r.status_code}: redirect not followed."
    return f"{path} answered HTTP {r.status_code}."


def _name(value: Any) -> str:
    """A model name, version or capability as the server gave it, printable and bounded."""
    text = "".join(c for c in str(value) if c.isprintable())
    return text[:MAX_NAME_CHARS]


_PROBES = {"dev": _probe_dev, "ollama": _probe_ollama, "openai": _probe_openai}
