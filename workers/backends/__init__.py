"""Backend adapters by kind. Adding a kind: a module beside ``dev.py`` and a line in ``_ADAPTERS``.

Adapters are imported when first asked for, so a web process that only needs a small helper from this
package (the token caps, the outbound URL rules) does not load every client library.
"""

from __future__ import annotations

import importlib

from workers.backends.base import Adapter, BackendError

_ADAPTERS: dict[str, str] = {
    "dev": "workers.backends.dev:DevAdapter",
    "ollama": "workers.backends.ollama:OllamaAdapter",
    "openai": "workers.backends.openai:OpenAIAdapter",
    "hf_local": "workers.backends.hf_local:HFLocalAdapter",
}
_instances: dict[str, Adapter] = {}


def get_adapter(kind: str) -> Adapter:
    """The process's adapter for ``kind`` (adapters hold pooled clients, so one each)."""
    adapter = _instances.get(kind)
    if adapter is None:
        path = _ADAPTERS.get(kind)
        if path is None:
            raise BackendError(f"No adapter for backend kind {kind!r} is installed in this worker.", retryable=False)
        module, _, name = path.partition(":")
        adapter = _instances[kind] = getattr(importlib.import_module(module), name)()
    return adapter
