#!/usr/bin/env python3
"""How close to its deadline (or its cancel) an adapter call stops, against the fake servers.

    .venv/bin/python bench/deadlines.py [-n 10]

The tests assert only that a call stops long before a server that takes a minute
(tests/test_backend_openai.py, tests/test_backend_ollama.py): that holds on any machine. This
measures the overshoot: seconds from the deadline (or the cancel) to the call's end, median and
max over ``n`` calls per case, for the OpenAI-compatible and Ollama adapters:

- ``silent server``: the server sends nothing; the call's timeout is 0.3 s;
- ``backend cap``: the same, the backend's own 0.3 s timeout capping a 60 s job timeout;
- ``trickling stream``: a chunk every 50 ms, the call's timeout 0.5 s (checked between chunks);
- ``cancel mid-stream``: the job's cancel is set 0.3 s into a streamed answer.

The overshoot a worker adds on top (its thread, its writes) is not in these figures. No database,
no Redis. Exit status 0 (figures only, no goal).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")

LONG_S = 60.0


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=10, help="calls per case (default 10)")
    args = p.parse_args()

    from tests.fakes.ollama_server import OllamaFake
    from tests.fakes.openai_server import OpenAIFake
    from workers.backends.base import BackendConfig, BackendError, GenerationRequest, JobCanceled
    from workers.backends.ollama import OllamaAdapter
    from workers.backends.openai import OpenAIAdapter

    reply = " ".join(f"w{i}" for i in range(int(LONG_S / 0.05)))

    def request(timeout_s: float) -> GenerationRequest:
        return GenerationRequest(job_id="b", messages=[{"role": "user", "content": "hi"}], timeout_s=timeout_s)

    def overshoot(adapter, backend: BackendConfig, timeout_s: float, cancel_after: float | None = None) -> float:
        req = request(timeout_s)
        if cancel_after is not None:
            threading.Timer(cancel_after, req.cancel.set).start()
        t0 = time.monotonic()
        try:
            adapter.generate(backend, req)
        except (BackendError, JobCanceled):
            pass
        else:
            raise RuntimeError("the call finished: the fake answered before the deadline")
        return time.monotonic() - t0 - (cancel_after if cancel_after is not None else min(timeout_s, backend.timeout_s))

    kinds = {
        "openai": (OpenAIFake, OpenAIAdapter, lambda f: f.base_url),
        "ollama": (OllamaFake, OllamaAdapter, lambda f: f.url),
    }
    cases = {
        "silent server": ({"latency_s": LONG_S}, {}, 0.3, None),
        "backend cap": ({"latency_s": LONG_S}, {"timeout_s": 0.3}, LONG_S, None),
        "trickling stream": ({"reply": reply, "chunk_delay_s": 0.05}, {}, 0.5, None),
        "cancel mid-stream": ({"reply": reply, "chunk_delay_s": 0.05}, {}, LONG_S, 0.3),
    }
    print(f"overshoot past the deadline or cancel, {args.n} calls each (ms): median / max")
    for kind, (fake_cls, adapter_cls, url) in kinds.items():
        for case, (knobs, backend_kw, timeout_s, cancel_after) in cases.items():
            runs = []
            for _ in range(args.n):
                with fake_cls(**knobs) as fake:
                    backend = BackendConfig(
                        name=kind,
                        kind=kind,
                        base_url=url(fake),
                        model="gpt-test" if kind == "openai" else "llama3.2",
                        timeout_s=backend_kw.get("timeout_s", LONG_S * 2),
                    )
                    runs.append(overshoot(adapter_cls(), backend, timeout_s, cancel_after))
            print(f"  {kind:<7} {case:<18} {statistics.median(runs) * 1000:7.1f} / {max(runs) * 1000:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
