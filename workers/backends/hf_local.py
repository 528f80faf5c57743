"""``hf_local``: a Hugging Face causal LM held resident in the worker process, run in batches.

The backend record names the model and how to hold it:

- ``model``: the local directory ``from_pretrained`` reads (or ``config.path``, when ``model`` is a
  display name that routing matches against jobs' ``model``). Loading is ``local_files_only``:
  a worker never downloads weights at run time.
- ``config.dtype``: ``bf16`` / ``fp16`` / ``fp32`` (default: bf16 on CUDA, fp32 on CPU, where
  bf16 matmuls are slow). ``config.device``: ``cuda``, ``cuda:1``, ``cpu`` (default: CUDA when
  available). ``config.max_context``: overrides the model's ``max_position_embeddings``.
  ``config.default_max_tokens``: new tokens for a job that names none (default 256).

A model is loaded once per process and kept (``_MODELS``, keyed by path, dtype and device):
loading a 1B model takes seconds, generating one answer tens of milliseconds per token. The
worker must therefore not fork after loading (CUDA does not survive ``fork``): see
``workers.runtime.gpu``.

Generation is split into three calls so the GPU worker can batch dynamically:
``start`` (tokenize and validate one request, which fails alone), ``step`` (one left-padded
``model.generate`` for many sequences, up to ``round_tokens`` new tokens each) and ``result``.
``generate_batch`` and ``generate`` are the plain forms built on them.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from workers.backends import tools
from workers.backends.base import BackendConfig, BackendError, GenerationRequest, GenerationResult

DEFAULT_MAX_TOKENS = 256
# A temperature below this is greedy decoding (as vLLM does): dividing logits by ~0 overflows.
GREEDY_BELOW = 1e-5
_DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
}


@dataclass
class LoadedModel:
    """A model and tokenizer resident in this process, with what generation needs to know about them."""

    path: str
    dtype: str
    device: str
    model: Any
    tokenizer: Any
    max_context: int
    eos_ids: frozenset[int]
    pad_id: int
    load_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)


_MODELS: dict[tuple[str, str, str], LoadedModel] = {}
_load_lock = threading.Lock()


def _torch() -> Any:
    try:
        import torch
    except ImportError:  # a worker without requirements-gpu.txt: the job fails with a reason
        raise BackendError(
            "hf_local needs torch and transformers (pip install -r requirements-gpu.txt)", retryable=False
        ) from None
    return torch


def resolve(backend: BackendConfig) -> tuple[str, str, str]:
    """(path, dtype name, device) for ``backend``; bad config is a permanent error."""
    torch = _torch()
    cfg = backend.config
    path = str(cfg.get("path") or backend.model or "").strip()
    if not path:
        raise BackendError(f"hf_local backend {backend.name!r} names no model path", retryable=False)
    device = str(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"hf_local backend {backend.name!r} wants {device}; no CUDA here", retryable=False)
    raw = str(cfg.get("dtype") or ("bf16" if device.startswith("cuda") else "fp32")).lower()
    if raw not in _DTYPES:
        raise BackendError(f"hf_local dtype {raw!r} is not one of bf16, fp16, fp32", retryable=False)
    return path, _DTYPES[raw], device


def load(backend: BackendConfig, *, warm_rows: int = 16, warm_tokens: int = 4) -> LoadedModel:
    """The resident model for ``backend``, loading it on first use (once per process).

    ``warm_rows`` and ``warm_tokens``: the largest batch the caller runs and its new tokens per
    round (the GPU worker passes ``BATCH_MAX`` and ``BATCH_ROUND_TOKENS``); the load runs one such
    round so that the first jobs do not pay for it (see ``_warm_up``).
    """
    key = resolve(backend)
    loaded = _MODELS.get(key)
    if loaded is not None:
        return loaded
    with _load_lock:  # two threads asking at once load it once
        loaded = _MODELS.get(key)
        if loaded is None:
            loaded = _MODELS[key] = _load(*key, backend=backend, warm=(warm_rows, warm_tokens))
    return loaded


def _load(path: str, dtype: str, device: str, *, backend: BackendConfig, warm: tuple[int, int]) -> LoadedModel:
    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a worker's log is JSON lines, not progress bars

    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BackendError(f"hf_local cannot load {path!r}: {exc}", retryable=False) from None
    model = model.to(device).eval()
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = next(iter(sorted(eos_ids)), 0)
    max_context = int(backend.config.get("max_context") or getattr(model.config, "max_position_embeddings", 2048))
    loaded = LoadedModel(path, dtype, device, model, tokenizer, max_context, eos_ids, pad_id, 0.0)
    _warm_up(loaded, tokenizer.bos_token_id, *warm)
    loaded.load_s = time.monotonic() - started
    return loaded


def _warm_up(m: LoadedModel, bos_id: int | None, rows: int, new_tokens: int) -> None:
    """Run a padded prefill and decode at one row, then one whole round at ``rows`` x ``new_tokens``.

    A fresh process's first ``generate`` pays for the CUDA context, cuBLAS handles and kernel
    selection, and a first batch would pay it in every job's latency. A short warm-up is not
    enough: what stays cold grows with the sequence length at the batch size (the allocator's
    blocks for the growing KV cache, by the look of it), so the warm-up decodes a whole round
    once per process. The measurements behind this are in docs/performance.md ("A fresh worker's
    first batch"; ``bench/first_generate.py``).
    """
    torch = _torch()
    token = m.pad_id if bos_id is None else bos_id
    width = min(64, max(2, m.max_context // 2))
    shapes = [(1, min(16, width), 4)]
    if rows > 1:
        shapes.append((rows, width, max(1, min(new_tokens, m.max_context - width))))
    for batch, cols, new in shapes:
        ids = torch.full((batch, cols), token, dtype=torch.long, device=m.device)
        mask = torch.ones_like(ids)
        mask[1:, : cols // 4] = 0  # some rows left-padded, as in real batches
        with torch.inference_mode():
            m.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,  # a random or real model may stop early: reach the length
                do_sample=False,
                pad_token_id=m.pad_id,
            )
    if m.device.startswith("cuda"):
        torch.cuda.synchronize()


@functools.cache
def _cache_kwarg(model_class: type) -> str:
    """The name ``generate`` takes a KV cache by, and returns it under: ``cache`` from transformers
    ~5.2x on (the old name then logs a deprecation), ``past_key_values`` before (our GPU host has 5.17)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def resident_models() -> list[dict[str, Any]]:
    """What this process holds, for worker status reports."""
    return [
        {"path": m.path, "dtype": m.dtype, "device": m.device, "load_s": round(m.load_s, 3)} for m in _MODELS.values()
    ]


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The chat as one prompt: the tokenizer's chat template when it has one, else plain lines.

    A single user message is sent as-is (a completion-style prompt), so a bare prompt costs
    exactly its own tokens.
    """
    chat = [{"role": str(m.get("role", "user")), "content": _content_text(m.get("content", ""))} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    if len(chat) == 1 and chat[0]["role"] == "user":
        return chat[0]["content"]
    return "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant:"


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI-style parts: keep the text ones
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


@dataclass
class Carry:
    """The KV cache a round's ``generate`` left, for the next round of the same sequences.

    ``rows``: the sequences of that call, in its row order; ``width``: the columns of its output
    (left padding included), the width the next round's input must have to match the cache.
    """

    cache: Any
    width: int
    rows: list[BatchRow]


@dataclass
class BatchRow:
    """One request inside a batch: its prompt ids, what it generated so far, and its budget.

    A sequence can span several batch rounds. When the next round runs the same sequences (or
    some of them: finished ones leave), it continues from the round's KV cache, so only the last
    token is fed; when a sequence joins, every row is prefilled again (prompt + generated ids).
    Greedy decoding continues exactly where it stopped either way.
    """

    request: GenerationRequest
    loaded: LoadedModel = field(repr=False)
    prompt_ids: list[int]
    max_new: int
    sampling: tuple[float, float] | None  # (temperature, top_p); None = greedy
    started: float
    deadline: float
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    rounds: int = 0
    generate_ms: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    carry: Carry | None = field(default=None, repr=False)  # the last round's KV cache, while it can be reused

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.generated)


class RowSampling:
    """A logits processor giving each row of a batch its own sampling: ``(temperature, top_p)``,
    or None for greedy decoding.

    transformers applies one temperature and one top-p to a whole ``generate`` call, so a batch
    of jobs with different settings would need one call per setting (on a GPU, each call costs
    about as much as the whole batch). Here a greedy row keeps only its argmax (its sampled
    token is then exactly greedy decoding's), and a sampled row is divided by its temperature
    and cut to its nucleus, as transformers' ``TopPLogitsWarper`` does for one setting.
    """

    def __init__(self, settings: list[tuple[float, float] | None], device: str) -> None:
        torch = _torch()
        self.greedy = torch.tensor([s is None for s in settings], device=device).unsqueeze(1)
        self.temperature = torch.tensor([s[0] if s else 1.0 for s in settings], device=device).unsqueeze(1)
        self.top_p = torch.tensor([s[1] if s else 1.0 for s in settings], device=device).unsqueeze(1)
        self.nucleus = any(s is not None and s[1] < 1.0 for s in settings)  # else no sort per step

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = _torch()
        best = scores.argmax(dim=-1, keepdim=True)
        greedy = torch.full_like(scores, float("-inf")).scatter_(1, best, 0.0)
        sampled = scores / self.temperature.to(scores.dtype)
        if self.nucleus:
            ordered, order = torch.sort(sampled, descending=False)
            cut = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - self.top_p.to(scores.dtype))
            cut[:, -1:] = False  # the most likely token always stays
            sampled = sampled.masked_fill(cut.scatter(1, order, cut), float("-inf"))
        return torch.where(self.greedy, greedy, sampled)


class HFLocalAdapter:
    kind = "hf_local"

    # --- the Adapter interface ------------------------------------------------------------------
    def generate(self, backend: BackendConfig, request: GenerationRequest) -> GenerationResult:
        """One request: a batch of one (its text reaches the delta sink whole, at the end)."""
        outcome = self.generate_batch(backend, [request])[0]
        if isinstance(outcome, BackendError):
            raise outcome
        tools.emit_whole(request, outcome)
        return outcome

    def generate_batch(
        self, backend: BackendConfig, requests: list[GenerationRequest], *, round_tokens: int | None = None
    ) -> list[GenerationResult | BackendError]:
        """Run ``requests`` together; each gets its own result, or its own error if it alone is bad."""
        outcomes: list[GenerationResult | BackendError | None] = [None] * len(requests)
        live: list[tuple[int, BatchRow]] = []
        for i, request in enumerate(requests):
            try:
                live.append((i, self.start(backend, request)))
            except BackendError as exc:
                outcomes[i] = exc
        while any(not s.done for _, s in live):
            self.step(backend, [s for _, s in live if not s.done], round_tokens=round_tokens)
        for i, seq in live:
            outcomes[i] = self.result(seq)
        return outcomes  # type: ignore[return-value]

    # --- the batching primitives ----------------------------------------------------------------
    def start(self, backend: BackendConfig, request: GenerationRequest) -> BatchRow:
        """Tokenize and check one request; raises a permanent BackendError for a bad one."""
        if request.images:
            raise BackendError("hf_local serves text-only models; the job has images", retryable=False)
        m = load(backend)
        text = render_prompt(m.tokenizer, request.messages)
        ids = list(m.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids:
            if m.tokenizer.bos_token_id is None:
                raise BackendError("the prompt is empty", retryable=False)
            ids = [m.tokenizer.bos_token_id]
        max_new = request.max_tokens
        if max_new is None:  # none asked: the default, as far as the context allows
            max_new = min(int(backend.config.get("default_max_tokens", DEFAULT_MAX_TOKENS)), m.max_context - len(ids))
        if max_new < 1 or len(ids) + max_new > m.max_context:
            raise BackendError(
                f"prompt is {len(ids)} tokens; with max_tokens {max_new} it exceeds the model's "
                f"context of {m.max_context} tokens",
                retryable=False,
            )
        sampling = None
        if request.temperature and request.temperature >= GREEDY_BELOW:  # None, 0 or ~0: greedy
            top_p = request.params.get("top_p", 1.0)
            if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
                raise BackendError(f"top_p must be a number in (0, 1], not {top_p!r}", retryable=False)
            sampling = (float(request.temperature), float(top_p))
        now = time.monotonic()
        return BatchRow(request, m, ids, max_new, sampling, started=now, deadline=now + request.timeout_s)

    def step(self, backend: BackendConfig, seqs: list[BatchRow], *, round_tokens: int | None = None) -> None:
        """One round: one ``model.generate`` per model for all its sequences, greedy and sampled
        alike (each row with its own temperature and top-p), up to ``round_tokens`` new tokens each.

        Exceptions (CUDA OOM, a bug) propagate: the caller decides how to isolate them.
        """
        groups: dict[int, list[BatchRow]] = defaultdict(list)
        for seq in seqs:
            if not seq.done:
                groups[id(seq.loaded)].append(seq)
        for group in groups.values():
            self._generate(group[0].loaded, group, round_tokens)

    def _generate(self, m: LoadedModel, group: list[BatchRow], round_tokens: int | None) -> None:
        torch = _torch()
        inputs = [s.prompt_ids + s.generated for s in group]
        carry = group[0].carry
        cache = None
        if carry is not None and all(s.carry is carry for s in group):
            # The same sequences as the last round, or some of them: continue from its cache.
            row_of = {id(s): i for i, s in enumerate(carry.rows)}
            keep = [row_of[id(s)] for s in group]
            cache, width = carry.cache, carry.width
            if keep != list(range(len(carry.rows))):
                cache.batch_select_indices(torch.tensor(keep, device=m.device))
        else:
            width = max(len(x) for x in inputs)
        # No reference to an unused cache survives into the call (two caches at once on the card), and
        # none to a used one after it fails: generate extends the cache in place.
        carry = None
        for s in group:
            s.carry = None
        # Left padding: every row's last real token sits in the last column, so the new tokens
        # of all rows start at the same position.
        ids = torch.full((len(group), width), m.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, x in enumerate(inputs):
            ids[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[row, width - len(x) :] = 1
        new = max(s.remaining for s in group)
        if round_tokens:
            new = min(new, round_tokens)
        kwargs: dict[str, Any] = {"do_sample": False}
        if any(s.sampling is not None for s in group):
            # transformers' own warpers take one setting per call: ours (per row) instead, theirs off.
            kwargs = {
                "do_sample": True,
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
                "logits_processor": [RowSampling([s.sampling for s in group], m.device)],
            }
        if cache is not None:
            kwargs[_cache_kwarg(type(m.model))] = cache
        started = time.monotonic()
        with m.lock, torch.inference_mode():
            try:
                result = m.model.generate(
                    input_ids=ids.to(m.device),
                    attention_mask=mask.to(m.device),
                    max_new_tokens=new,
                    pad_token_id=m.pad_id,
                    eos_token_id=sorted(m.eos_ids) or None,
                    return_dict_in_generate=True,
                    **kwargs,
                )
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()  # the failed call's blocks back, before the caller tries smaller
                raise
        out = result.sequences
        tokens = out[:, width:].tolist()
        elapsed_ms = (time.monotonic() - started) * 1000
        for seq, row in zip(group, tokens, strict=True):
            seq.rounds += 1
            seq.generate_ms += elapsed_ms
            seq.batch_sizes.append(len(group))
            for token in row[: seq.remaining]:
                if token in m.eos_ids:
                    seq.finish_reason = "stop"
                    break
                seq.generated.append(token)
            if seq.finish_reason is None and seq.remaining <= 0:
                seq.finish_reason = "length"
        kept = getattr(result, _cache_kwarg(type(m.model)), None)
        if any(not seq.done for seq in group) and kept is not None:
            # A row still running generated all ``new`` tokens: it is exactly its row of ``out``.
            carried = Carry(kept, out.shape[1], list(group))
            for seq in group:
                seq.carry = None if seq.done else carried

    def result(self, seq: BatchRow) -> GenerationResult:
        """The finished sequence's own output, usage and timing (its EOS is not counted or shown)."""
        return GenerationResult(
            output=seq.loaded.tokenizer.decode(seq.generated, skip_special_tokens=True),
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.generated),
            finish_reason=seq.finish_reason or "length",
            latency_ms=int((time.monotonic() - seq.started) * 1000),
            timings={
                "generate_ms": round(seq.generate_ms, 1),
                "rounds": float(seq.rounds),
                "batch_size": float(max(seq.batch_sizes, default=1)),
            },
        )
