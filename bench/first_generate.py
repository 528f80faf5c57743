#!/usr/bin/env python3
"""Why a GPU worker's first real batch is slow although the model was warmed up at load.

    python bench/first_generate.py [--rows 64] [--round-tokens 128] [--adapter-only]   # GPU host
    P4_TINY=1 python bench/first_generate.py                      # tiny model, to test it on a CPU

P4's ``--cold`` run showed a GPU worker process's first real batch taking seconds longer than the
next ones, although ``hf_local`` had warmed the model up at load. In one fresh process this loads
the model as the worker does, then times ``generate`` calls that each change one thing towards a
real job, then the adapter's own batches (``--adapter-only``: those alone). A cost once paid is not
paid again, so the order matters. Prints one line per step and writes ``first_generate.json``.
Recorded figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
TINY = os.environ.get("P4_TINY") == "1"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8 if TINY else 64)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--prompt-tokens", type=int, default=16 if TINY else 64)
    p.add_argument("--new-tokens", type=int, default=16 if TINY else 64)
    p.add_argument("--out", default=os.environ.get("OUT") or ".")
    p.add_argument("--adapter-only", action="store_true", help="the adapter's batches straight after the load")
    p.add_argument(
        "--round-tokens", type=int, default=4, help="the load's warm-up round (the GPU worker: BATCH_ROUND_TOKENS)"
    )
    args = p.parse_args()

    import torch

    from tests import gpu_model
    from workers.backends import hf_local
    from workers.backends.base import BackendConfig, GenerationRequest

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if TINY:
        config = gpu_model.tiny_config(vocab_size=512, max_position_embeddings=256)
    else:
        config = gpu_model.bench_config(layers=args.layers)
    path = Path(tempfile.mkdtemp(prefix="first-gen-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # 2.2 GB for the 1.1B model
    gpu_model.save_word_level_model(path, config, device=device, dtype=dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    backend = BackendConfig(name="m", kind="hf_local", model=str(path), config={"dtype": "bf16" if cuda else "fp32"})
    started = time.perf_counter()
    m = hf_local.load(backend, warm_rows=args.rows, warm_tokens=args.round_tokens)  # as the GPU worker
    steps = [("load + warm-up (as the worker)", time.perf_counter() - started)]

    rows, width, new = args.rows, args.prompt_tokens, args.new_tokens
    ids = torch.full((rows, width), 5, dtype=torch.long, device=m.device)
    mask = torch.ones_like(ids)
    eos = sorted(m.eos_ids) or None

    def timed(name: str, **kwargs: object) -> None:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            m.model.generate(do_sample=False, pad_token_id=m.pad_id, **kwargs)
        sync()
        steps.append((name, time.perf_counter() - t))

    base = {"input_ids": ids, "attention_mask": mask}
    if not args.adapter_only:
        timed("warm-up kwargs, 32 new tokens", **base, max_new_tokens=32, min_new_tokens=32)
        timed(f"warm-up kwargs, {new} new tokens", **base, max_new_tokens=new, min_new_tokens=new)
        timed(f"job kwargs (eos_token_id, no min_new_tokens), {new} new", **base, max_new_tokens=new, eos_token_id=eos)
        cpu = {"input_ids": ids.cpu().to(m.device), "attention_mask": mask.cpu().to(m.device)}
        timed("job kwargs, ids built on the CPU", **cpu, max_new_tokens=new, eos_token_id=eos)
    adapter = hf_local.HFLocalAdapter()
    words = " ".join(f"w{i % 900 + 3}" for i in range(width))
    requests = [
        GenerationRequest(job_id=str(i), messages=[{"role": "user", "content": words}], max_tokens=new)
        for i in range(rows)
    ]
    for attempt in (1, 2, 3):
        sync()
        t = time.perf_counter()
        adapter.generate_batch(backend, requests, round_tokens=128)
        sync()
        steps.append((f"adapter.generate_batch #{attempt}", time.perf_counter() - t))

    for name, seconds in steps:
        print(f"{seconds:8.3f} s  {name}")
    info = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "rows": rows,
        "prompt_tokens": width,
        "new_tokens": new,
        "steps": steps,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_generate.json").write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
