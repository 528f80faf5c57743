"""The hf_local adapter on a tiny random Llama built offline and loaded through ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu_model import TEST_CONFIG, TEST_DEVICE, save_tiny_model
from workers.backends import get_adapter, hf_local
from workers.backends.base import BackendConfig, BackendError, GenerationRequest
from workers.backends.hf_local import HFLocalAdapter

# Optional dependencies (requirements-gpu.txt): without them this module is skipped.
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def backend(tiny_model_dir) -> BackendConfig:
    return BackendConfig(name="tiny", kind="hf_local", model=str(tiny_model_dir), config=dict(TEST_CONFIG))


def req(prompt: str, max_tokens: int | None = 6, **kw) -> GenerationRequest:
    return GenerationRequest(
        job_id=f"job-{prompt[:8]}", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, **kw
    )


def test_adapter_is_registered_for_the_hf_local_kind():
    assert isinstance(get_adapter("hf_local"), HFLocalAdapter)


def test_model_is_loaded_once_and_stays_resident(backend):
    first = hf_local.load(backend)
    HFLocalAdapter().generate(backend, req("hello"))
    HFLocalAdapter().generate(backend, req("again"))
    assert hf_local.load(backend) is first
    assert [k for k in hf_local._MODELS if k[0] == backend.model] == [(backend.model, "float32", TEST_DEVICE)]
    assert first.model.device.type == TEST_DEVICE.split(":")[0] and first.model.dtype == torch.float32
    assert any(m["path"] == backend.model for m in hf_local.resident_models())


def test_single_generation_reports_usage_finish_reason_and_timing(backend):
    result = HFLocalAdapter().generate(backend, req("héllo", max_tokens=5))
    assert result.prompt_tokens == len("héllo".encode())  # byte-level: one token per byte
    assert result.finish_reason in ("length", "stop")
    if result.finish_reason == "length":
        assert result.completion_tokens == 5
    assert result.latency_ms >= 0 and result.timings["batch_size"] == 1 and result.timings["rounds"] == 1


def test_batch_gives_each_request_its_own_output_same_as_alone(backend):
    adapter = HFLocalAdapter()
    requests = [req("a", 3), req("a much longer prompt here", 7), req("mid length", 5), req("zz", None)]
    batched = adapter.generate_batch(backend, requests)
    alone = [adapter.generate(backend, r) for r in requests]
    assert [b.output for b in batched] == [a.output for a in alone]
    assert [b.prompt_tokens for b in batched] == [1, 25, 10, 2]
    assert [b.completion_tokens for b in batched] == [a.completion_tokens for a in alone]
    assert batched[3].completion_tokens <= hf_local.DEFAULT_MAX_TOKENS
    assert all(b.timings["batch_size"] == 4 for b in batched)


def test_bounded_rounds_continue_where_they_stopped(backend):
    adapter = HFLocalAdapter()
    requests = [req("round one", 9), req("two", 4)]
    whole = adapter.generate_batch(backend, requests)
    rounds = adapter.generate_batch(backend, requests, round_tokens=2)
    assert [r.output for r in rounds] == [w.output for w in whole]
    assert rounds[0].timings["rounds"] >= 2


def test_next_round_continues_from_the_cache_and_a_joining_sequence_prefills_again(backend):
    """Rounds of the same sequences (or fewer: finished ones leave) feed one token per row; a
    sequence joining makes the round prefill every row. Answers equal the one-call ones."""
    adapter = HFLocalAdapter()
    hf_local.load(backend)
    fed: list[list[int]] = []  # per step: tokens fed per forward

    def count(module, args, out):
        if type(module).__name__ == "LlamaModel":
            fed[-1].append(out.last_hidden_state.shape[1])

    # Prompts the tiny model answers without an early EOS, so every round has rows to run.
    first = [adapter.start(backend, req("row two", 9)), adapter.start(backend, req("alpha", 4))]
    late = adapter.start(backend, req("late one", 5))
    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        steps = [first, first, first, [*first, late], [*first, late], [*first, late]]
        for seqs in steps:
            fed.append([])
            adapter.step(backend, seqs, round_tokens=2)
    finally:
        hook.remove()
    assert fed[0][0] > 1 and set(fed[0][1:]) <= {1}  # the first round prefills, then decodes
    assert first[1].rounds == 2 and first[0].batch_sizes == [2, 2, 1, 2, 2]  # "alpha" left after round 2
    assert set(fed[1]) == {1} and set(fed[2]) == {1}  # the same sequences (or fewer): no prefill
    assert fed[3][0] > 1  # one joined: every row prefilled again
    assert set(fed[4]) <= {1} and set(fed[5]) <= {1}
    whole = adapter.generate_batch(backend, [req("row two", 9), req("alpha", 4)])
    assert [adapter.result(s).output for s in first] == [w.output for w in whole]
    assert adapter.result(late).output == adapter.generate(backend, req("late one", 5)).output


def test_bad_request_fails_alone_without_failing_the_batch(backend):
    too_long = req("x" * 300, 5)  # the tiny model's context is 256 tokens
    with_image = req("look", 5, images=["aGVsbG8="])
    outcomes = HFLocalAdapter().generate_batch(backend, [req("fine", 4), too_long, with_image, req("also fine", 4)])
    assert isinstance(outcomes[1], BackendError) and not outcomes[1].retryable
    assert "exceeds the model's context of 256 tokens" in outcomes[1].message
    assert isinstance(outcomes[2], BackendError) and "text-only" in outcomes[2].message
    assert outcomes[0].output == HFLocalAdapter().generate(backend, req("fine", 4)).output
    assert not isinstance(outcomes[3], BackendError)


def test_greedy_and_sampled_requests_run_as_one_generate_each_with_its_own_setting(backend):
    """One call for the batch whatever the sampling settings; a greedy row's answer is exactly its
    answer alone, and a nucleus too small for a second token is greedy decoding too."""
    hf_local.load(backend)  # the load's warm-up is not what is counted
    requests = [
        req("greedy one", 12),
        req("hot", 12, temperature=1.0),
        req("nucleus of one", 12, temperature=0.8, params={"top_p": 1e-9}),
        req("greedy two", 12),
        req("warm", 12, temperature=0.5, params={"top_p": 0.9}),
    ]
    rows: list[int] = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: (
            rows.append(out.logits.shape[0]) if type(module).__name__ == "LlamaForCausalLM" else None
        )
    )
    try:
        batched = HFLocalAdapter().generate_batch(backend, requests)
    finally:
        hook.remove()
    assert set(rows) == {5}  # every forward of the round carried all five rows
    greedy = {
        p: HFLocalAdapter().generate(backend, req(p, 12)).output for p in ("greedy one", "greedy two", "nucleus of one")
    }
    assert [batched[i].output for i in (0, 2, 3)] == [greedy[p] for p in ("greedy one", "nucleus of one", "greedy two")]
    assert all(isinstance(r.output, str) and r.completion_tokens >= 1 for r in batched)


def test_sampling_settings_are_checked_per_request(backend):
    bad = [req("bad", 4, temperature=0.7, params={"top_p": p}) for p in (-1, 0, 1.5, "0.9", True)]
    outcomes = HFLocalAdapter().generate_batch(backend, [req("fine", 4), *bad])
    assert not isinstance(outcomes[0], BackendError)
    for outcome in outcomes[1:]:
        assert isinstance(outcome, BackendError) and not outcome.retryable and "top_p must be" in outcome.message
    # A temperature too small to divide by is greedy decoding (as vLLM treats it).
    tiny = HFLocalAdapter().generate(backend, req("tiny temperature", 8, temperature=1e-9))
    assert tiny.output == HFLocalAdapter().generate(backend, req("tiny temperature", 8)).output


def test_eos_stops_a_sequence_with_finish_reason_stop(backend, tmp_path):
    from transformers import GenerationConfig

    plain = HFLocalAdapter().start(backend, req("stop here", 8))
    HFLocalAdapter().step(backend, [plain])
    tokens = plain.generated
    k = tokens.index(tokens[3])  # where that token first appears
    # Same weights, but that token also counts as end-of-sequence.
    stop_dir = save_tiny_model(tmp_path / "stop")
    gen = GenerationConfig.from_pretrained(stop_dir)
    gen.eos_token_id = [2, tokens[3]]
    gen.save_pretrained(stop_dir)
    stopped = HFLocalAdapter().generate(
        BackendConfig(name="stop", kind="hf_local", model=str(stop_dir)), req("stop here", 8)
    )
    assert stopped.finish_reason == "stop" and stopped.completion_tokens == k


def test_dtype_and_device_come_from_the_backend_record(tiny_model_dir):
    cfg = BackendConfig(
        name="bf", kind="hf_local", model="display-name", config={"path": str(tiny_model_dir), "dtype": "bf16"}
    )
    assert hf_local.resolve(cfg) == (str(tiny_model_dir), "bfloat16", "cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert hf_local.load(cfg).model.dtype == torch.bfloat16
        assert HFLocalAdapter().generate(cfg, req("bf16 on cpu", 2)).prompt_tokens == 11


@pytest.mark.parametrize(
    ("config", "model", "message"),
    [
        ({"dtype": "int3"}, "x", "is not one of bf16, fp16, fp32"),
        ({}, "", "names no model path"),
        ({"device": "cpu"}, "/nonexistent/model", "cannot load"),
    ],
)
def test_bad_backend_config_is_a_permanent_error(config, model, message):
    cfg = BackendConfig(name="bad", kind="hf_local", model=model, config=config)
    with pytest.raises(BackendError, match=message) as info:
        HFLocalAdapter().generate(cfg, req("hi"))
    assert not info.value.retryable
