"""Backend adapters by kind. Adding a kind: a module beside ``dev.py`` and a line in ``_ADAPTERS``."""

from __future__ import annotations

from workers.backends.base import Adapter, BackendError
from workers.backends.dev import DevAdapter
from workers.backends.hf_local import HFLocalAdapter
from workers.backends.ollama import OllamaAdapter
from workers.backends.openai import OpenAIAdapter

_ADAPTERS: dict[str, type] = {
    "dev": DevAdapter,
    "ollama": OllamaAdapter,
    "openai": OpenAIAdapter,
    "hf_local": HFLocalAdapter,
}
_instances: dict[str, Adapter] = {}


def get_adapter(kind: str) -> Adapter:
    """The process's adapter for ``kind`` (adapters hold pooled clients, so one each)."""
    adapter = _instances.get(kind)
    if adapter is None:
        cls = _ADAPTERS.get(kind)
        if cls is None:
            raise BackendError(f"No adapter for backend kind {kind!r} is installed in this worker.", retryable=False)
        adapter = _instances[kind] = cls()
    return adapter
