#!/usr/bin/env python3
"""A batch whose jobs ask for different sampling settings, against the same batch all greedy.

    python bench/mixed_sampling.py [--jobs 64] [--new-tokens N] [--rounds 7]

``hf_local`` runs one ``generate`` for a batch whatever its jobs' temperature and top-p
(``RowSampling``) rather than one ``generate`` per distinct setting, one after the other.
This times ``HFLocalAdapter.generate_batch`` on ``--jobs`` requests cycling through greedy and
three sampling settings, and on the same requests all greedy, alternating, and prints the medians
and their ratio (1.0 = mixed settings cost nothing). On a GPU it builds the 1.1B benchmark model
in bf16 (64 new tokens by default), elsewhere the tiny test model (16).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = [None, (0.7, 1.0), (1.0, 0.9), (0.5, 0.95)]  # (temperature, top_p); None = greedy


def main() -> int:
    import torch

    from tests import gpu_model
    from workers.backends import hf_local
    from workers.backends.base import BackendConfig, GenerationRequest

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64 if cuda else 16)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()

    path = Path(tempfile.mkdtemp(prefix="mixed-sampling-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # 2.2 GB for the 1.1B model
    if cuda:
        gpu_model.save_word_level_model(path, gpu_model.bench_config(layers=22), device="cuda", dtype=torch.bfloat16)
        prompt = " ".join(f"w{i + 3}" for i in range(64))
    else:
        gpu_model.save_tiny_model(path)
        prompt = "a prompt of some length"
    backend = BackendConfig(name="m", kind="hf_local", model=str(path), config={})
    hf_local.load(backend, warm_rows=args.jobs, warm_tokens=args.new_tokens)

    def request(i: int, setting: tuple[float, float] | None) -> GenerationRequest:
        extra = {} if setting is None else {"temperature": setting[0], "params": {"top_p": setting[1]}}
        messages = [{"role": "user", "content": f"{prompt} {i}" if not cuda else prompt}]
        return GenerationRequest(job_id=str(i), messages=messages, max_tokens=args.new_tokens, **extra)

    mixed = [request(i, SETTINGS[i % len(SETTINGS)]) for i in range(args.jobs)]
    greedy = [request(i, None) for i in range(args.jobs)]
    adapter = hf_local.HFLocalAdapter()

    def timed(requests: list[GenerationRequest]) -> float:
        started = time.perf_counter()
        adapter.generate_batch(backend, requests, round_tokens=args.new_tokens)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    timed(mixed), timed(greedy)  # first use of each path
    times: dict[str, list[float]] = {"mixed": [], "greedy": []}
    for _ in range(args.rounds):
        times["mixed"].append(timed(mixed))
        times["greedy"].append(timed(greedy))
    m, g = statistics.median(times["mixed"]), statistics.median(times["greedy"])
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "jobs": args.jobs,
        "new_tokens": args.new_tokens,
        "settings": len(SETTINGS),
        "mixed_s": round(m, 4),
        "greedy_s": round(g, 4),
        "mixed_over_greedy": round(m / g, 2),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
