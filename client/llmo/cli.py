"""``llmo``: the command line over :class:`llmo.Client`.

Exit status: 0 done (the job succeeded, the batch completed with no failed request); 1 the job or batch
ended otherwise (failed, canceled, expired; failed requests); 2 a usage error; 3 the API refused (4xx/5xx)
or could not be reached; 4 not finished (a wait that timed out, the result of a job still running);
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmo._core import DEFAULT_URL, __version__
from llmo.client import Client
from llmo.errors import ApiError, LlmoError, Unauthorized, WaitTimeout
from llmo.models import PRIORITIES, Batch, Job, JobResult, StreamEvent

OK, NOT_OK, USAGE, API_ERROR, NOT_FINISHED, INTERRUPTED = 0, 1, 2, 3, 4, 130
JOB_STATES = ("queued", "running", "succeeded", "failed", "canceled", "expired")


# --- output ------------------------------------------------------------------------------------
def _dump(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


def _note(args: argparse.Namespace, text: str) -> None:
    """Progress for a person, on stderr (stdout stays the answer, in --json mode too)."""
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _show_job(job: Job) -> None:
    rows = {
        "id": job.id,
        "state": job.state,
        "priority": job.priority,
        "backend": job.backend,
        "model": job.model or None,
        "attempts": job.attempts,
        "queue position": job.queue_position,
        "eta (s)": job.eta_s,
        "created": job.created_at.isoformat() if job.created_at else None,
        "finished": job.finished_at.isoformat() if job.finished_at else None,
        "latency (ms)": job.latency_ms,
        "error": job.error or None,
    }
    for name, value in rows.items():
        if value is not None:
            print(f"{name:<15} {value}")


def _finish_result(args: argparse.Namespace, result: JobResult) -> int:
    """Print a result (the output for a person, the document with --json) and say how it ended."""
    if args.json:
        _dump(result.raw)
    elif result.succeeded:
        print(result.output or "")
        if result.tool_calls:
            _dump(result.tool_calls)
    if not result.final:
        _note(args, f"job {result.id} is {result.state}")
        return NOT_FINISHED
    if not result.succeeded:
        _note(args, f"job {result.id} {result.state}" + (f": {result.error}" if result.error else ""))
        return NOT_OK
    return OK


def _batch_line(batch: Batch) -> str:
    c = batch.request_counts
    return f"batch {batch.id} {batch.status}: {c.completed}/{c.total} completed, {c.failed} failed"


# --- commands ------------------------------------------------------------------------------------
def _kv(pairs: Sequence[str] | None, what: str) -> dict[str, Any] | None:
    """``KEY=VALUE`` options; a VALUE that is JSON (a number, true, an object) is taken as such."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"llmo: {what} must be KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _read(source: str) -> str:
    return sys.stdin.read() if source == "-" else source


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    prompt = _read(args.prompt) if args.prompt is not None else None
    messages = None
    if args.messages:
        text = sys.stdin.read() if args.messages == "-" else Path(args.messages).read_text()
        messages = json.loads(text)
    elif args.system is not None and prompt is not None:
        messages, prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}], None
    params = _kv(args.param, "--param")
    if args.params:
        params = {**json.loads(args.params), **(params or {})}
    job = client.submit(
        prompt,
        messages=messages,
        images=[Path(p) for p in args.image] if args.image else None,
        priority=args.priority,
        model=args.model,
        backend=args.backend,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        params=params,
        metadata=_kv(args.metadata, "--metadata"),
        timeout_s=args.job_timeout,
        queue_timeout_s=args.queue_timeout,
        requires_multimodal=True if args.multimodal else None,
        stream=True if args.stream else None,
        idempotency_key=args.idempotency_key,
        rate_limit_wait=args.rate_limit_wait,
    )
    how = "replayed" if job.replayed else "accepted"
    if args.stream:
        _note(args, f"job {job.id} {how} ({job.state} on {job.backend}); streaming its output")
        return _follow(client, args, job.id, None)
    if args.wait:
        _note(args, f"job {job.id} {how} ({job.state} on {job.backend}); waiting for its result")
        return _finish_result(args, client.wait(job.id, timeout=args.wait_timeout))
    if args.json:
        _dump(job.raw)
    else:
        print(job.id)
        _note(args, f"job {job.id} {how}: {job.state} on {job.backend}, priority {job.priority}")
    return OK


def _follow(client: Client, args: argparse.Namespace, job_id: str, after: str | None) -> int:
    end: StreamEvent | None = None
    for event in client.stream(job_id, after=after):
        if args.json:
            print(json.dumps({"event": event.event, "id": event.id, "data": event.data}), flush=True)
        elif event.event == "delta":
            sys.stdout.write(event.content)
            sys.stdout.flush()
        elif event.event == "reset":
            _note(args, "\n[the output starts again: a retry]")
        if event.event == "end":
            end = event
    result = end.result if end else None
    if result is None:
        return NOT_FINISHED
    if not args.json:
        print()
        if not result.succeeded:
            _note(args, f"job {result.id} {result.state}" + (f": {result.error}" if result.error else ""))
    return OK if result.succeeded else NOT_OK


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    job = client.get(args.id)
    _dump(job.raw) if args.json else _show_job(job)
    return OK


def cmd_result(client: Client, args: argparse.Namespace) -> int:
    if args.wait:
        return _finish_result(args, client.wait(args.id, timeout=args.wait_timeout))
    return _finish_result(args, client.result(args.id))


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    return _finish_result(args, client.wait(args.id, timeout=args.wait_timeout))


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel(args.id)
    _dump(job.raw) if args.json else print(f"job {job.id} {job.state}")
    return OK


def cmd_stream(client: Client, args: argparse.Namespace) -> int:
    return _follow(client, args, args.id, args.after)


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    limit = None if args.all else args.limit
    jobs = list(client.jobs(state=args.state, priority=args.priority, backend=args.backend, limit=limit))
    if args.json:
        _dump([job.raw for job in jobs])
        return OK
    print(f"{'ID':<36}  {'STATE':<9}  {'PRIORITY':<8}  {'BACKEND':<16}  {'CREATED':<25}  LATENCY")
    for job in jobs:
        created = job.created_at.isoformat(timespec="seconds") if job.created_at else "-"
        latency = f"{job.latency_ms} ms" if job.latency_ms is not None else "-"
        state, priority, backend = job.state, job.priority or "-", job.backend or "-"
        print(f"{job.id:<36}  {state:<9}  {priority:<8}  {backend:<16}  {created:<25}  {latency}")
    return OK


def _save_batch_files(client: Client, args: argparse.Namespace, batch: Batch) -> None:
    for file_id, target, what in (
        (batch.output_file_id, args.out, "results"),
        (batch.error_file_id, args.errors, "errors"),
    ):
        if not file_id:
            continue
        if not target:
            _note(args, f"{what}: file {file_id} (llmo batch results {batch.id} --out PATH)")
            continue
        content = client.file_content(file_id)
        if target == "-":
            sys.stdout.write(content.decode())
        else:
            Path(target).write_bytes(content)
            _note(args, f"{what}: {len(content.splitlines())} lines written to {target}")


def _batch_outcome(args: argparse.Namespace, batch: Batch) -> int:
    for err in batch.errors:
        where = f"line {err.line}: " if err.line is not None else ""
        _note(args, f"  {where}{err.message or err.code}")
    if not batch.final:
        return NOT_FINISHED
    return OK if batch.status == "completed" and batch.request_counts.failed == 0 else NOT_OK


def _batch_wait(client: Client, args: argparse.Namespace, batch: Batch) -> Batch:
    """Wait for the end, with a progress line on stderr whenever the counts change."""
    start, last = time.monotonic(), ""
    while not batch.final:
        line = _batch_line(batch)
        if line != last:
            _note(args, line)
            last = line
        waited = time.monotonic() - start
        if args.wait_timeout is not None and waited >= args.wait_timeout:
            raise WaitTimeout("batch", batch.id, batch.status, waited)
        time.sleep(args.poll)
        batch = client.batch_get(batch.id)
    return batch


def _end_batch(client: Client, args: argparse.Namespace, batch: Batch, *, save: bool) -> int:
    if save and batch.final:
        _save_batch_files(client, args, batch)
    if args.json and args.out != "-":
        _dump(batch.raw)
    elif not args.json:
        _note(args, _batch_line(batch))
    return _batch_outcome(args, batch)


def cmd_batch_submit(client: Client, args: argparse.Namespace) -> int:
    uploaded = client.files_upload(args.file)
    _note(args, f"uploaded {args.file} as {uploaded.id} ({uploaded.bytes} bytes)")
    batch = client.batch_create(
        uploaded.id, completion_window=args.completion_window, metadata=_kv(args.metadata, "--metadata")
    )
    if not args.wait:
        if args.json:
            _dump(batch.raw)
        else:
            print(batch.id)
            _note(args, _batch_line(batch))
        return OK
    return _end_batch(client, args, _batch_wait(client, args, batch), save=True)


def cmd_batch_get(client: Client, args: argparse.Namespace) -> int:
    batch = client.batch_get(args.id)
    _dump(batch.raw) if args.json else print(_batch_line(batch))
    for err in batch.errors:
        _note(args, f"  {f'line {err.line}: ' if err.line is not None else ''}{err.message or err.code}")
    return OK


def cmd_batch_wait(client: Client, args: argparse.Namespace) -> int:
    return _end_batch(client, args, _batch_wait(client, args, client.batch_get(args.id)), save=True)


def cmd_batch_results(client: Client, args: argparse.Namespace) -> int:
    batch = client.batch_get(args.id)
    if args.out is None:
        args.out = "-"
    _save_batch_files(client, args, batch)
    return _batch_outcome(args, batch)


def cmd_batch_cancel(client: Client, args: argparse.Namespace) -> int:
    batch = client.batch_cancel(args.id)
    _dump(batch.raw) if args.json else print(_batch_line(batch))
    return OK


def cmd_batch_list(client: Client, args: argparse.Namespace) -> int:
    batches = list(client.batches(limit=args.limit))
    if args.json:
        _dump([b.raw for b in batches])
        return OK
    for batch in batches:
        print(_batch_line(batch))
    return OK


# --- the parser ------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The connection and output options, accepted before and after the command."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument("--url", default=default(None), help=f"API base URL (env LLMO_URL; default {DEFAULT_URL})")
    parser.add_argument("--token", default=default(None), help="API token or tenant key (env LLMO_TOKEN)")
    parser.add_argument("--json", action="store_true", default=default(False), help="print JSON documents")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False), help="no progress on stderr")
    parser.add_argument("--http-timeout", type=float, default=default(30.0), help="seconds per HTTP request")
    parser.add_argument("--retries", type=int, default=default(3), help="retries of connection errors and 503s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmo", description="LLM Orchestrator from the command line.")
    parser.add_argument("--version", action="version", version=f"llmo {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        _common(p, top=False)
        p.set_defaults(handler=handler)
        return p

    def waiting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wait-timeout", type=float, default=None, metavar="S", help="give up waiting after S s")

    p = command("submit", cmd_submit, "submit a job (POST /jobs)")
    p.add_argument("prompt", nargs="?", help="the prompt ('-': read it from stdin)")
    p.add_argument("--messages", metavar="FILE", help="a JSON list of {role, content} instead of a prompt ('-': stdin)")
    p.add_argument("--system", help="a system message before the prompt")
    p.add_argument("--priority", choices=PRIORITIES)
    p.add_argument("--model")
    p.add_argument("--backend", help="pin the job to this backend")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="a backend parameter (repeatable)")
    p.add_argument("--params", metavar="JSON", help="backend parameters as one JSON object")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="metadata to keep (repeatable)")
    p.add_argument("--image", action="append", metavar="PATH", help="an image file (repeatable)")
    p.add_argument("--multimodal", action="store_true", help="route only to multimodal backends")
    p.add_argument("--job-timeout", type=int, metavar="S", help="the job's deadline (timeout_s)")
    p.add_argument("--queue-timeout", type=int, metavar="S", help="expire if not started within S s")
    p.add_argument("--idempotency-key", help="default: a new UUID (reused by the client's own retries)")
    p.add_argument("--rate-limit-wait", type=float, metavar="S", help="on a 429 wait its Retry-After, up to S s")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--wait", action="store_true", help="wait for the result and print it")
    how.add_argument("--stream", action="store_true", help="stream the output as it is generated")
    waiting(p)

    p = command("get", cmd_get, "a job's status (GET /jobs/<id>)")
    p.add_argument("id")
    p = command("result", cmd_result, "a job's result (GET /jobs/<id>/result)")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="wait for the job to end")
    waiting(p)
    p = command("wait", cmd_wait, "wait for a job to end and print its result")
    p.add_argument("id")
    waiting(p)
    p = command("cancel", cmd_cancel, "cancel a queued or running job")
    p.add_argument("id")
    p = command("stream", cmd_stream, "follow a job's output as it is generated (a job submitted with --stream)")
    p.add_argument("id")
    p.add_argument("--after", metavar="EVENT_ID", help="resume after this event id")
    p = command("jobs", cmd_jobs, "list your jobs, newest first")
    p.add_argument("--state", choices=JOB_STATES)
    p.add_argument("--priority", choices=PRIORITIES)
    p.add_argument("--backend")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p.add_argument("--all", action="store_true", help="every job, page after page")

    batch = sub.add_parser("batch", help="OpenAI-format batches (/v1/files, /v1/batches)")
    bsub = batch.add_subparsers(dest="batch_command", required=True, metavar="BATCH_COMMAND")

    def outputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", metavar="PATH", help="write the output file (one line per request) here ('-': stdout)")
        p.add_argument("--errors", metavar="PATH", help="write the error file (failed lines) here")

    def polling(p: argparse.ArgumentParser) -> None:
        waiting(p)
        p.add_argument("--poll", type=float, default=2.0, metavar="S", help="seconds between polls (default 2)")

    p = command("submit", cmd_batch_submit, "upload a JSONL file of requests and start its batch", bsub)
    p.add_argument("file", help="JSONL: one {custom_id, method, url, body} per line")
    p.add_argument("--completion-window", default="24h")
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    p.add_argument("--wait", action="store_true", help="wait for the batch to end")
    polling(p)
    outputs(p)
    p = command("get", cmd_batch_get, "a batch's status and counts", bsub)
    p.add_argument("id")
    p = command("wait", cmd_batch_wait, "wait for a batch to end", bsub)
    p.add_argument("id")
    polling(p)
    outputs(p)
    p = command("results", cmd_batch_results, "download a batch's output (and error) file", bsub)
    p.add_argument("id")
    outputs(p)
    p = command("cancel", cmd_batch_cancel, "cancel a batch", bsub)
    p.add_argument("id")
    p = command("list", cmd_batch_list, "your batches, newest first", bsub)
    p.add_argument("--limit", type=int, default=20)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt", "") is None and not getattr(args, "messages", None):
        print("llmo submit: give a prompt (or '-' to read it from stdin) or --messages FILE", file=sys.stderr)
        return USAGE
    client = Client(args.url, args.token, timeout=args.http_timeout, max_retries=args.retries)
    try:
        with client:
            return args.handler(client, args)
    except WaitTimeout as exc:
        print(f"llmo: {exc}", file=sys.stderr)
        return NOT_FINISHED
    except ApiError as exc:
        hint = ""
        if isinstance(exc, Unauthorized) and not client.settings.token:
            hint = " (give a token: --token or LLMO_TOKEN)"
        print(f"llmo: {exc}{hint}", file=sys.stderr)
        if args.json and exc.body is not None:
            _dump(exc.body)
        return API_ERROR
    except LlmoError as exc:
        print(f"llmo: {exc}", file=sys.stderr)
        return API_ERROR
    except (OSError, ValueError) as exc:  # a file that cannot be read, JSON that does not parse
        print(f"llmo: {exc}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
