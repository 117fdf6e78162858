"""The built-in tiny chat model: a small Llama-style checkpoint with random weights and the shipped tokenizer.

It lets every job run end to end with no download. The weights are drawn from a fixed seed, so
the same spec always gives the same checkpoint; it is written once into a cache folder (keyed by a
hash of the spec and the tokenizer files) and then loaded with ``from_pretrained`` like any model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

ASSETS_DIR = Path(__file__).parent / "assets" / "tiny-chat"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and initialisation of a tiny Llama-style model (vocab matches the shipped tokenizer)."""

    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    init_std: float = 0.02
    lm_head_std: float = 0.25
    seed: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 0


BUILTIN_MODELS = {"tiny_chat": TinyModelSpec()}


def spec_key(spec: TinyModelSpec) -> str:
    """A short hash of the spec, the generator's format version and the tokenizer files."""
    h = hashlib.sha256(json.dumps({"spec": asdict(spec), "version": FORMAT_VERSION}, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        h.update((ASSETS_DIR / name).read_bytes())
    return h.hexdigest()[:12]


def materialise(name: str, cache_dir: str | os.PathLike) -> Path:
    """Return the directory of built-in model ``name``, writing it into ``cache_dir`` on first use."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    target = Path(cache_dir) / f"{name}-{spec_key(spec)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(spec, tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process wrote it first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def write_model(spec: TinyModelSpec, out_dir: Path) -> None:
    """Write config, safetensors weights, generation config and tokenizer files into ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            if pname.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                std = spec.lm_head_std if pname.startswith("lm_head") else spec.init_std
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    out_dir.mkdir(parents=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    GenerationConfig(eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id).save_pretrained(out_dir)
    for fname in TOKENIZER_FILES:
        shutil.copyfile(ASSETS_DIR / fname, out_dir / fname)
