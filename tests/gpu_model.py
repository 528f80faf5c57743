"""Build small (or benchmark-sized) randomly initialised Llama models and tokenizers offline.

Nothing here touches the Hugging Face hub: the tokenizer is made with the ``tokenizers``
library and wrapped in ``PreTrainedTokenizerFast``; the model is a ``LlamaForCausalLM``
built from a config with random weights. Both are written with ``save_pretrained`` so
that the code under test loads them through the real ``from_pretrained`` path.

Used by tests/test_hf_local.py, tests/test_gpu_worker.py and bench/p4_gpu.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Where the hf_local and GPU worker tests run the model: the CPU here and in CI; on a GPU host
# ``TEST_HF_DEVICE=cuda``. fp32 on either, so that a batched answer must equal the same prompt's
# answer alone exactly (greedy); bf16 is what bench/p4_gpu.py measures.
TEST_DEVICE = os.environ.get("TEST_HF_DEVICE", "cpu")
TEST_CONFIG = {"device": TEST_DEVICE, "dtype": "fp32"}

SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def byte_level_tokenizer() -> Any:
    """A byte-level tokenizer: 3 specials + one token per byte (259 ids), any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def word_level_tokenizer(vocab_size: int) -> Any:
    """One token per whitespace-separated word ``w<i>``: a prompt of n words is exactly n tokens.

    The benchmark uses it so that a randomly initialised model with a 32k vocabulary
    decodes every id it can generate.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    vocab["<unk>"] = vocab_size  # one past the model's ids; never generated
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def tiny_config(**overrides: Any) -> Any:
    """hidden 32, 2 layers, vocab 259: fast on 2 CPU cores, still the real Llama code path."""
    from transformers import LlamaConfig

    params: dict[str, Any] = {
        "vocab_size": 256 + len(SPECIALS),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
    }
    params.update(overrides)
    return LlamaConfig(**params)


def bench_config(layers: int = 16) -> Any:
    """~1.1B parameters at 16 layers (hidden 2048, 32 heads, MLP 5632, vocab 32000), like TinyLlama."""
    return tiny_config(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )


def build_model(config: Any, *, seed: int = 0, device: str = "cpu", dtype: Any = None) -> Any:
    """A randomly initialised LlamaForCausalLM, built directly on ``device`` (no CPU round trip on a GPU)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    # A random model's generation config would otherwise carry no EOS/pad ids.
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model.eval()


def save_tiny_model(path: Path | str, *, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a tiny model + byte-level tokenizer to ``path`` (a directory ``from_pretrained`` reads)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_model(tiny_config(**config_overrides), seed=seed).save_pretrained(path)
    byte_level_tokenizer().save_pretrained(path)
    return path


def save_word_level_model(path: Path | str, config: Any, *, device: str = "cpu", dtype: Any = None) -> Path:
    """Write a random model of ``config`` + a word-level tokenizer of its vocabulary to ``path``,
    built on ``device`` and freed again (the benchmarks load it through ``from_pretrained``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(config, device=device, dtype=dtype)
    model.save_pretrained(path)
    word_level_tokenizer(config.vocab_size).save_pretrained(path)
    del model
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return path
