#!/usr/bin/env python3
"""P4: tokens/s through the GPU worker vs raw ``model.generate``, and vs the worker unbatched.

    python bench/p4_gpu.py [--jobs 64] [--unbatched-jobs 8] [--layers 22] [--out DIR]
    P4_TINY=1 python bench/p4_gpu.py      # the same run with a tiny model, to test the script on a CPU

One run, in this order:

1. Django on SQLite in ``<work>/p4.sqlite3`` (``migrate``), Redis db ``P4_REDIS_DB`` (default 12,
   flushed before and after).
2. A randomly initialised Llama-style model (hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632,
   vocab 32000: ~1.1B parameters) is built directly on the GPU in bf16 and saved with
   ``save_pretrained`` (plus a word-level tokenizer: one token per word), so the worker loads it
   through the real ``from_pretrained`` path.
3. (a) raw: ``model.generate`` at batch ``--jobs`` (64-token prompts, 64 new tokens, greedy), after
   a warm-up, in this process; also at batch 1 for reference. The model is then freed.
4. (b) batched: a long-running ``manage.py rqworker gpu-high gpu-normal gpu-low --worker-class
   workers.runtime.gpu.GpuWorker`` with ``BATCH_MAX=64`` first drains a warm-up set of ``--jobs``
   jobs of the same shape; then ``--jobs`` jobs are submitted through the real submit path
   (routing pinned to the ``hf_local`` backend, pool ``gpu``) in one transaction, so all wait in
   Redis at once. tokens/s = completion tokens written to the DB / (last ``finished_at`` - the
   moment the submit transaction's enqueues were done): from every job waiting to every result
   stored. ``--cold`` instead starts a
   fresh burst worker on the waiting jobs and counts from the first claim (``started_at``); its
   start-up and model load are reported apart.
5. (c) unbatched: the same with ``BATCH_MAX=1`` on ``--unbatched-jobs`` jobs (one at a time, so
   a subset gives the same rate; the figure is a rate, not extrapolated).

Prints the table and the ratios (b)/(a) (goal >= 0.85) and (b)/(c) (goal >= 20x); writes
``p4.json`` into ``--out``. Exit status 0 when both goals are met, 1 when not, 2 on error.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUEUES = ["gpu-high", "gpu-normal", "gpu-low"]
TINY = os.environ.get("P4_TINY") == "1"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Defaults: 64 / 8 / 64 / 64, or 16 / 4 / 16 / 16 with P4_TINY=1; an explicit value always wins.
    p.add_argument("--jobs", type=int)
    p.add_argument("--unbatched-jobs", type=int)
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--out", default=os.environ.get("OUT") or ".")
    p.add_argument("--work", default="", help="scratch directory (default: a new one under /tmp)")
    p.add_argument(
        "--cold",
        action="store_true",
        help="measure a fresh burst worker's first batch (start-up costs included) instead of the steady state",
    )
    args = p.parse_args()
    defaults = (16, 4, 16, 16) if TINY else (64, 8, 64, 64)
    for name, default in zip(("jobs", "unbatched_jobs", "prompt_tokens", "new_tokens"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def setup_django(work: Path) -> dict[str, str]:
    redis_db = os.environ.get("P4_REDIS_DB", "12")
    env = {
        "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings",
        "DATABASE_URL": f"sqlite:///{work / 'p4.sqlite3'}",
        "REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
        "VAR_DIR": str(work / "var"),
        "LOG_LEVEL": "WARNING",
        "DEBUG": "0",
        "SECRET_KEY": "p4-bench-not-secret",
        "ALLOWED_HOSTS": "localhost",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from orchestrator_site.redis import redis_client

    redis_client().flushdb()
    return env


def build_and_save(args: argparse.Namespace, path: Path) -> tuple[Any, Any, dict[str, Any]]:
    import torch

    from tests import gpu_model

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if TINY:
        config = gpu_model.tiny_config(vocab_size=512, max_position_embeddings=args.prompt_tokens + args.new_tokens + 8)
    else:
        config = gpu_model.bench_config(layers=args.layers)
    started = time.monotonic()
    model = gpu_model.build_model(config, device=device, dtype=dtype)
    build_s = time.monotonic() - started
    tokenizer = gpu_model.word_level_tokenizer(config.vocab_size)
    started = time.monotonic()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "build_s": round(build_s, 2),
        "save_s": round(time.monotonic() - started, 2),
    }
    return model, tokenizer, info


def prompts(n: int, tokens: int, vocab: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, vocab)}" for _ in range(tokens)) for _ in range(n)]


def raw_generate(model: Any, tokenizer: Any, texts: list[str], new_tokens: int) -> dict[str, float]:
    """``model.generate`` on the whole batch at once: the ceiling the worker is compared with."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    eos = model.generation_config.eos_token_id

    def run() -> tuple[float, int]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        # Count what a job would get: tokens before the first EOS.
        tokens = sum(row.index(eos) if eos in row else len(row) for row in new)
        return elapsed, tokens

    cold, _ = run()  # warm-up: CUDA context, cuBLAS handles, allocator (reported: the worker warms up at load)
    elapsed, tokens = run()
    return {
        "batch": len(texts),
        "seconds": round(elapsed, 3),
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "cold_seconds": round(cold, 3),
    }


def submit_jobs(texts: list[str], new_tokens: int, priority: str = "normal") -> list[str]:
    """Through the real submit path (validation, routing, row, enqueue after commit)."""
    from django.contrib.auth import get_user_model

    from jobs.api.serializers import JobCreateSerializer
    from jobs.services import submit

    user, _ = get_user_model().objects.get_or_create(username="p4")
    ids = []
    for text in texts:
        body = {"prompt": text, "backend": "p4-model", "max_tokens": new_tokens, "priority": priority}
        serializer = JobCreateSerializer(data=body)
        serializer.is_valid(raise_exception=True)
        ids.append(str(submit(serializer.validated_data, user=user, body=body, idempotency_key=None).job.pk))
    return ids


def run_worker(env: dict[str, str], batch_max: int, log_path: Path) -> float:
    """``--cold``: a fresh burst worker drains the waiting jobs; its first batch pays first-use costs."""
    cmd = [sys.executable, "manage.py", "rqworker", *QUEUES, "--burst"]
    cmd += ["--worker-class", "workers.runtime.gpu.GpuWorker"]
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**os.environ, **env, "BATCH_MAX": str(batch_max), "BATCH_WAIT_MS": "10", "LOG_LEVEL": "INFO"},
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited {proc.returncode}; see {log_path}:\n{log_path.read_text()[-3000:]}")
    return wall


def wait_done(ids: list[str], timeout: float = 600) -> None:
    from jobs.models import TERMINAL_STATES, Job

    deadline = time.monotonic() + timeout
    while Job.objects.filter(pk__in=ids).exclude(state__in=TERMINAL_STATES).exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs not finished after {timeout} s")
        time.sleep(0.05)


def run_warm_worker(
    env: dict[str, str], batch_max: int, log_path: Path, warmup: list[str], measured: list[str], new_tokens: int
) -> tuple[list[str], float, datetime]:
    """The steady state: one long-running worker process first runs a warm-up set of jobs of the
    same shapes (first-use costs: CUDA kernels, cuBLAS heuristics and allocator growth per shape),
    then the measured jobs are submitted while it is idle; it is stopped with SIGTERM (a warm
    shutdown) at the end. Both sets are submitted in one transaction each (see below), so the
    warm-up batch has exactly the measured batch's shape."""
    from django.db import transaction
    from django.utils import timezone

    cmd = [sys.executable, "manage.py", "rqworker", *QUEUES, "--worker-class", "workers.runtime.gpu.GpuWorker"]
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            # The jobs land within a few ms (see below); the wait window ends when the batch is full.
            # LOG_LEVEL INFO as in production: the worker logs each job and each batch ("batch done").
            env={**os.environ, **env, "BATCH_MAX": str(batch_max), "BATCH_WAIT_MS": "3000", "LOG_LEVEL": "INFO"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            # One transaction: the 64 rows commit together and their on-commit enqueues follow
            # back to back (~ms), so the batch sees "64 jobs waiting" rather than a trickle that
            # the submitting Python loop (tens of ms per job) would make.
            with transaction.atomic():
                warm_ids = submit_jobs(warmup, new_tokens)
            wait_done(warm_ids)
            with transaction.atomic():
                ids = submit_jobs(measured, new_tokens)
            # The on-commit enqueues ran when the block ended: every job is waiting in Redis now.
            all_queued = timezone.now()
            wait_done(ids)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return ids, time.monotonic() - started, all_queued


def batch_lines(log_path: Path, jobs: int) -> list[dict[str, Any]]:
    """The worker's last "batch done" log lines that cover ``jobs`` jobs (the measured ones)."""
    lines = []
    for line in log_path.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == "batch done":
            lines.append(doc)
    picked: list[dict[str, Any]] = []
    while lines and sum(d["jobs"] for d in picked) < jobs:
        picked.insert(0, lines.pop())
    return picked


def worker_figures(ids: list[str], wall_s: float, log_path: Path, all_queued: datetime | None) -> dict[str, float]:
    """Tokens/s over a window read from the rows, and how that window divides: the worker's
    ``model.generate`` time (its "batch done" lines) and the rest (dequeue, claims, tokenizing,
    result writes: the worker's overhead).

    ``all_queued`` (the warm runs): from the moment every job was waiting in Redis (the submit
    transaction committed and its enqueues ran; the worker idle) to the last result in the
    database, so the worker's dequeue and fetch count too. Otherwise (``--cold``): from the first
    claim (``started_at``), leaving the fresh worker's start-up and model load out (reported apart)."""
    from jobs.models import Job, JobState

    jobs = list(Job.objects.filter(pk__in=ids))
    states = {j.state for j in jobs}
    if states != {JobState.SUCCEEDED}:
        errors = {j.error for j in jobs if j.error}
        raise RuntimeError(f"jobs ended {states}: {sorted(errors)[:3]}")
    last = max(j.finished_at for j in jobs)
    since_claim = (last - min(j.started_at for j in jobs)).total_seconds()
    since_queued = (last - all_queued).total_seconds() if all_queued else None
    window = since_queued if since_queued is not None else since_claim
    tokens = sum(j.completion_tokens for j in jobs)
    latencies = sorted(j.latency_ms for j in jobs)
    batches = batch_lines(log_path, len(jobs))
    generate_s = sum(d["generate_s"] for d in batches)
    return {
        "jobs": len(jobs),
        "seconds": round(window, 3),
        "window": "all jobs waiting in Redis -> last result" if all_queued else "first claim -> last result",
        "seconds_since_first_claim": round(since_claim, 4),
        "seconds_since_all_queued": round(since_queued, 4) if since_queued is not None else None,
        "tokens": tokens,
        "tokens_per_s": tokens / window,
        "process_wall_s": round(wall_s, 2),
        "latency_ms_p50": latencies[len(latencies) // 2],
        "latency_ms_max": latencies[-1],
        "batches": len(batches),
        "generate_s": round(generate_s, 4),
        "overhead_s": round(window - generate_s, 4),
        "batch_wall_s": round(sum(d["wall_s"] for d in batches), 4),
    }


def main() -> int:
    args = parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="p4-"))
    if not args.work:  # ours: the model (2.2 GB at 1.1B) and the SQLite file go with it
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = setup_django(work)

    import torch

    model_dir = work / "model"
    model, tokenizer, info = build_and_save(args, model_dir)
    print(f"model: {info['params'] / 1e9:.2f}B params, {info['dtype']} on {info['device']}", flush=True)
    texts = prompts(args.jobs, args.prompt_tokens, info["vocab"], seed=1)
    raw = raw_generate(model, tokenizer, texts, args.new_tokens)
    raw1 = raw_generate(model, tokenizer, texts[:1], args.new_tokens)
    print(f"(a) raw generate: batch {raw['batch']} {raw['tokens_per_s']:.0f} tok/s; batch 1 {raw1['tokens_per_s']:.1f}")
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    from routing import policies
    from routing.models import Backend, BackendKind, RoutingPolicy

    Backend.objects.create(
        name="p4-model",
        kind=BackendKind.HF_LOCAL,
        model=str(model_dir),
        pool="gpu",
        max_context_tokens=4096,
        timeout_s=600,
        config={"dtype": "bf16" if torch.cuda.is_available() else "fp32"},
    )
    policies.activate(RoutingPolicy.objects.create(name="p4", strategy="ordered", params={"order": ["p4-model"]}))

    def measure(batch_max: int, texts: list[str], seed: int, log: Path) -> dict[str, float]:
        if args.cold:
            ids = submit_jobs(texts, args.new_tokens)
            return worker_figures(ids, run_worker(env, batch_max, log), log, None)
        warmup = prompts(len(texts), args.prompt_tokens, info["vocab"], seed=seed + 100)
        ids, wall, all_queued = run_warm_worker(env, batch_max, log, warmup, texts, args.new_tokens)
        return worker_figures(ids, wall, log, all_queued)

    # BATCH_MAX above the job count would hold the batch open for the whole wait window (tiny mode).
    batch_max = min(64, len(texts))
    batched = measure(batch_max, texts, 1, out / "worker_batched.log")
    print(
        f"(b) worker, BATCH_MAX={batch_max}: {batched['tokens_per_s']:.0f} tok/s over {batched['seconds']} s",
        flush=True,
    )

    texts = prompts(args.unbatched_jobs, args.prompt_tokens, info["vocab"], seed=2)
    unbatched = measure(1, texts, 2, out / "worker_unbatched.log")
    print(f"(c) worker, BATCH_MAX=1: {unbatched['tokens_per_s']:.1f} tok/s over {unbatched['seconds']} s", flush=True)

    from orchestrator_site.redis import redis_client

    redis_client().flushdb()
    ratio_raw = batched["tokens_per_s"] / raw["tokens_per_s"]
    ratio_unbatched = batched["tokens_per_s"] / unbatched["tokens_per_s"]
    passed = ratio_raw >= 0.85 and ratio_unbatched >= 20
    report = {
        "model": info,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "tiny": TINY,
        "worker_mode": "cold (fresh burst worker, first batch)" if args.cold else "warm (after a warm-up set of jobs)",
        "raw_batch": raw,
        "raw_batch1": raw1,
        "worker_batched": batched,
        "worker_unbatched": unbatched,
        "batched_over_raw": round(ratio_raw, 3),
        # Where a gap to raw comes from: the worker's own generate call vs raw's, and its overhead share.
        "worker_generate_over_raw": round(batched["generate_s"] / raw["seconds"], 3) if raw["seconds"] else None,
        "overhead_share": round(batched["overhead_s"] / batched["seconds"], 3),
        "batched_over_unbatched": round(ratio_unbatched, 1),
        "pass": passed,
    }
    (out / "p4.json").write_text(json.dumps(report, indent=2, default=str))
    print()
    print(f"P4 on {info['device']} ({info['params'] / 1e9:.2f}B params, {info['dtype']}, torch {info['torch']})")
    print(f"  {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each, greedy")
    print(f"  worker: {report['worker_mode']}")
    print(f"  {'what':<44} {'tokens/s':>10} {'seconds':>9} {'tokens':>7}")
    rows = [
        (f"(a) raw model.generate, batch {raw['batch']}", raw),
        ("    raw model.generate, batch 1", raw1),
        (f"(b) GPU worker, BATCH_MAX={batch_max}, {batched['jobs']} jobs", batched),
        (f"(c) GPU worker, BATCH_MAX=1, {unbatched['jobs']} jobs", unbatched),
    ]
    for label, r in rows:
        print(f"  {label:<44} {r['tokens_per_s']:>10.1f} {r['seconds']:>9.3f} {r['tokens']:>7}")
    print(f"  (b)/(a) = {ratio_raw:.3f}  (goal >= 0.85)")
    print(f"  (b)/(c) = {ratio_unbatched:.1f}x  (goal >= 20x)")
    print(
        f"  (b)'s window {batched['seconds']} s = worker's generate {batched['generate_s']} s"
        f" + overhead {batched['overhead_s']} s (dequeue, claims, tokenizing, result writes),"
        f" in {batched['batches']} batch(es) ({batched['window']});"
        f" raw generate {raw['seconds']} s"
    )
    print(f"  worker process wall (start-up + model load + jobs): (b) {batched['process_wall_s']} s")
    print(f"  raw batch {raw['batch']}: first (cold) generate {raw['cold_seconds']} s, then {raw['seconds']} s")
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # one line a person can read on the device's output tail
        import traceback

        traceback.print_exc()
        print(f"P4 could not run: {exc}", file=sys.stderr)
        sys.exit(2)
