"""Load (or build with random weights) a transformers decoder-only model and its tokenizer."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from engine.config import ModelConfig
from engine.model.attention import ATTN_IMPLEMENTATION
from engine.model.errors import ModelLoadError
from engine.model.lean_load import lean_slice, random_slice

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelShape:
    """What the engine needs to know of the model to size its cache and check requests."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(
    name: str | torch.dtype, config: PretrainedConfig | None, device: torch.device
) -> torch.dtype:
    """``auto``: the checkpoint's dtype on CUDA (bfloat16 if it names none), float32 on CPU."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(declared, str):
            declared = _DTYPES.get(declared)
        return declared if declared in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_model(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    """``from_pretrained`` from a local path or hub id, with paged attention switched on."""
    check_paths(cfg)
    try:
        config = AutoConfig.from_pretrained(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as exc:  # transformers raises OSError, ValueError, ... depending on the cause
        raise ModelLoadError(f"cannot load model config from {cfg.model!r}: {exc}") from exc
    dtype = resolve_dtype(cfg.dtype, config, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model,
            revision=cfg.revision,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=ATTN_IMPLEMENTATION,
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load model weights from {cfg.model!r}: {exc}") from exc
    return prepare_model(model, device)


INIT_MODES = ("module", "per_parameter", "auto")


def build_random_model(
    config: PretrainedConfig,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    init: str = "module",
) -> PreTrainedModel:
    """A model of ``config``'s shape with random weights (tests and benchmarks).

    ``init``: ``module``, transformers' own init of the whole model after ``torch.manual_seed(seed)``;
    ``per_parameter``, each parameter drawn on ``device`` from a generator seeded with (seed, its
    name), the weights a tensor-parallel run of any size builds (``engine/model/lean_load.py``; ValueError
    for a family whose init it does not know); ``auto``, per_parameter where known, else module.
    """
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {', '.join(INIT_MODES)}, got {init!r}")
    device = torch.device(device)
    config = copy.deepcopy(config)  # the model keeps its config: never share it with other models
    torch_dtype = resolve_dtype(dtype, config, device)
    if init != "module":
        if init == "per_parameter":
            lean = random_slice(config, torch_dtype, device, seed)
        else:
            lean = lean_slice(config, torch_dtype, device, seed=seed)
        if lean is not None:
            return prepare_model(lean, device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
    return prepare_model(model, device)


def prepare_model(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model.to(device).eval().requires_grad_(False)


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local folder rather than a hub id (``name`` or ``namespace/name``)."""
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or (os.sep != "/" and os.sep in path)
        or ("/" in path and os.path.isdir(path.split("/", 1)[0]))
    )


def check_paths(cfg: ModelConfig) -> None:
    """Say plainly what is wrong with a local model or tokenizer folder, before transformers takes it for a hub id.

    ModelLoadError: ``no such folder: <path>`` for a local-looking path that does not exist,
    ``no config.json in <folder>`` for a model folder without one.
    """
    for path, is_model in ((cfg.model, True), (cfg.tokenizer, False)):
        if not path:
            continue
        folder = os.path.expanduser(path)
        if os.path.isdir(folder):
            if is_model and not os.path.isfile(os.path.join(folder, "config.json")):
                raise ModelLoadError(f"no config.json in {path}")
        elif os.path.exists(folder):
            raise ModelLoadError(f"not a folder: {path} (a model or tokenizer is a folder or a hub id)")
        elif looks_local(path):
            raise ModelLoadError(f"no such folder: {path}")


def load_tokenizer(cfg: ModelConfig):
    check_paths(cfg)
    source = cfg.tokenizer or cfg.model
    try:
        return AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer from {source!r}: {exc}") from exc


def model_shape(model: PreTrainedModel) -> ModelShape:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=model.get_output_embeddings().weight.shape[0],
        max_model_len=getattr(config, "max_position_embeddings", None) or 2048,
    )


def eos_token_ids(model: PreTrainedModel, tokenizer) -> frozenset[int]:
    """EOS ids of the model's generation config, plus the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(e) for e in eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
