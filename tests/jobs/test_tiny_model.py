"""The built-in tiny chat model: deterministic, cached, loadable like any checkpoint."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from jobs.tiny_model import BUILTIN_MODELS, materialise


def test_materialised_twice_gives_identical_files(tmp_path):
    a = materialise("tiny_chat", tmp_path / "a")
    b = materialise("tiny_chat", tmp_path / "b")
    assert a.name == b.name
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert (
        materialise("tiny_chat", tmp_path / "a") == a
        and (a / "model.safetensors").stat().st_mtime_ns == mtime
    )
    assert not list((tmp_path / "a").glob(".*tmp*")), "no temporary folder left behind"


def test_shape_matches_the_shipped_tokenizer(tmp_path):
    path = materialise("tiny_chat", tmp_path)
    spec = BUILTIN_MODELS["tiny_chat"]
    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert config.model_type == "llama" and config.vocab_size == len(tok) == 2048
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
    ) == (
        spec.hidden_size,
        spec.num_hidden_layers,
        spec.num_attention_heads,
        spec.num_key_value_heads,
    )
    assert config.max_position_embeddings == 2048
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == config.eos_token_id
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False
    )
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2


def test_unknown_builtin_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown built-in model 'huge'"):
        materialise("huge", tmp_path)
