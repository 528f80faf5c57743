#!/usr/bin/env python3
"""What bounded rounds cost: a batch of long answers in rounds of ``--round-tokens`` vs one call.

    python bench/rounds.py [--jobs 16] [--new-tokens N] [--round-tokens 32] [--reps 5]

The GPU worker runs a batch in rounds (``BATCH_ROUND_TOKENS``) so that waiting jobs can join and
finished ones report. A round that runs the same sequences as the last one continues from its KV
cache instead of feeding prompt + generated ids again (a prefill per round). This times
``HFLocalAdapter.generate_batch`` with ``round_tokens`` against the same batch in one call,
alternating, and prints the medians and their ratio (1.0 = rounds cost nothing). On a GPU it
builds the 1.1B benchmark model in bf16 (512 new tokens by default), elsewhere a tiny one
(192).
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


def main() -> int:
    import torch

    from tests import gpu_model
    from workers.backends import hf_local
    from workers.backends.base import BackendConfig, GenerationRequest

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=512 if cuda else 192)
    p.add_argument("--round-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()

    # A 32k vocabulary (one token per word), as a real model has: the random model then all but
    # never draws EOS, so every answer runs its full length and the two ways do the same work.
    path = Path(tempfile.mkdtemp(prefix="rounds-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # 2.2 GB for the 1.1B model
    if cuda:
        config, device, dtype = gpu_model.bench_config(layers=22), "cuda", torch.bfloat16
    else:
        config = gpu_model.tiny_config(vocab_size=32000, max_position_embeddings=args.new_tokens + 96)
        device, dtype = "cpu", torch.float32
    gpu_model.save_word_level_model(path, config, device=device, dtype=dtype)
    prompts = [" ".join(f"w{(i * 7 + j) % 31000 + 3}" for j in range(64)) for i in range(args.jobs)]
    backend = BackendConfig(name="m", kind="hf_local", model=str(path), config={})
    hf_local.load(backend, warm_rows=args.jobs, warm_tokens=args.round_tokens)
    adapter = hf_local.HFLocalAdapter()
    requests = [
        GenerationRequest(job_id=str(i), messages=[{"role": "user", "content": text}], max_tokens=args.new_tokens)
        for i, text in enumerate(prompts)
    ]

    def timed(round_tokens: int | None) -> tuple[float, int]:
        started = time.perf_counter()
        results = adapter.generate_batch(backend, requests, round_tokens=round_tokens)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, sum(r.completion_tokens for r in results)

    timed(args.round_tokens), timed(None)  # first use of each shape
    times: dict[str, list[float]] = {"rounds": [], "whole": []}
    tokens = 0
    for _ in range(args.reps):
        seconds, tokens = timed(args.round_tokens)
        times["rounds"].append(seconds)
        times["whole"].append(timed(None)[0])
    r, w = statistics.median(times["rounds"]), statistics.median(times["whole"])
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                "jobs": args.jobs,
                "new_tokens": args.new_tokens,
                "round_tokens": args.round_tokens,
                "tokens": tokens,
                "rounds_s": round(r, 4),
                "whole_s": round(w, 4),
                "rounds_over_whole": round(r / w, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
