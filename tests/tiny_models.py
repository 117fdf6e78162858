"""Tiny random models of each supported architecture, the shipped tokenizer, and transformers references."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "jobs" / "assets" / "tiny-chat"
VOCAB = 2048
EOS = 2

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=EOS,
    pad_token_id=0,
    bos_token_id=None,
    initializer_range=0.2,
)

ARCHS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),  # attention bias on q/k/v, tied embeddings
    "qwen3": ("Qwen3Config", {"head_dim": 16}),  # q/k norms
    "mistral": ("MistralConfig", {"sliding_window": 12}),
    "gemma": ("GemmaConfig", {"head_dim": 32, "num_key_value_heads": 1}),  # multi-query, tied embeddings
    "gemma2": (
        "Gemma2Config",
        {"head_dim": 16, "sliding_window": 12, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    ),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 12}),
}


def make_config(arch: str, **overrides):
    name, extra = ARCHS[arch]
    return getattr(transformers, name)(**{**_COMMON, **extra, **overrides})


def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


QWEN2_TOKENIZER_DIR = Path(
    os.environ.get(
        "BATCHGEN_QWEN2_TOKENIZER", Path(__file__).resolve().parents[2] / "shared/data/qwen2-tokenizer"
    )
)
"""The real Qwen2 tokenizer (151,646 tokens): ``BATCHGEN_QWEN2_TOKENIZER``, else beside the checkout."""
QWEN2_VOCAB = 151936


def large_vocab_tokenizer() -> tuple[object, int]:
    """(tokenizer, model vocabulary size): the real Qwen2 tokenizer with Qwen2's vocabulary where it is
    found, else the shipped tokenizer with ``VOCAB``."""
    if (QWEN2_TOKENIZER_DIR / "vocab.json").exists():
        return AutoTokenizer.from_pretrained(QWEN2_TOKENIZER_DIR), QWEN2_VOCAB
    return tokenizer(), VOCAB


def devices() -> list:
    """CPU always; CUDA (marked gpu) when present."""
    return [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ]


def make_llm(
    arch: str = "llama", device: str = "cpu", tok=None, config_overrides: dict | None = None, **options
) -> LLM:
    options.setdefault("num_blocks", 256)
    options.setdefault("block_size", 8)
    return LLM(make_config(arch, **(config_overrides or {})), tok, dtype="float32", device=device, **options)


def reference_model(llm: LLM):
    """A transformers model with the engine model's weights, on transformers' own eager attention."""
    model = llm.engine.model
    ref = AutoModelForCausalLM.from_config(
        copy.deepcopy(model.config), dtype=torch.float32, attn_implementation="eager"
    )
    ref.load_state_dict(model.state_dict())
    return ref.to(model.device).eval()


@torch.inference_mode()
def hf_greedy(ref, prompt: list[int], max_new_tokens: int, eos: int | None = EOS) -> list[int]:
    ids = torch.tensor([prompt], device=ref.device)
    out = ref.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def random_prompts(count: int, lengths: list[int] | None = None, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or torch.randint(1, 60, (count,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
