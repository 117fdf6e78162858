"""The one place that turns a model path, a model object or a config into an engine.

``LLM``, the jobs, the benchmarks and tensor parallelism all come through ``build_engine``: on
one device it loads or builds the model and wraps it in a :class:`Worker`; with
``tensor_parallel_size`` > 1 it starts the ranks, each building its own slice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from engine.config import EngineConfig, ModelConfig
from engine.llm_engine import LLMEngine
from engine.model.lean_load import build_meta_model
from engine.model.loader import build_random_model, load_model, load_tokenizer, prepare_model, resolve_device
from engine.model.slicing import slice_model
from engine.parallel.source import ModelSource
from engine.parallel.start import start_worker
from engine.worker import Worker

ModelSpec = str | ModelConfig | PreTrainedModel | PretrainedConfig
"""A checkpoint (a path or hub id, or a :class:`ModelConfig`), a loaded model, or a config (random weights)."""
MODEL_OPTIONS = frozenset(f.name for f in dataclasses.fields(ModelConfig)) - {"model", "tokenizer"}


def build_engine(
    model: ModelSpec,
    tokenizer: Any = None,
    config: EngineConfig | None = None,
    *,
    dtype: Any = "auto",
    seed: int | None = None,
    **model_options: Any,
) -> LLMEngine:
    """An engine over ``model``.

    ``tokenizer``: a tokenizer object, or a path (a checkpoint's own is loaded when None).
    ``dtype`` and ``model_options`` (:class:`ModelConfig` fields) apply to checkpoints named by a
    string; ``dtype`` and ``seed`` (default: the engine's) to a config's random weights.
    """
    config = config or EngineConfig()
    unknown = set(model_options) - MODEL_OPTIONS
    if unknown:
        raise TypeError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    if isinstance(model, str):
        model = ModelConfig(
            model=model,
            tokenizer=tokenizer if isinstance(tokenizer, str) else None,
            dtype=dtype,
            **model_options,
        )
    if isinstance(model, ModelConfig) and (tokenizer is None or isinstance(tokenizer, str)):
        tokenizer = load_tokenizer(model)
    seed = config.seed if seed is None else seed
    if config.tensor_parallel_size > 1:
        if isinstance(model, ModelConfig):
            source = ModelSource(model_cfg=model)
        elif isinstance(model, PretrainedConfig):
            source = ModelSource(config=model, dtype=dtype, seed=seed)
        else:
            source = ModelSource(model=model)
        return LLMEngine(start_worker(source, config), tokenizer, config)
    device = resolve_device(config.device)
    if isinstance(model, ModelConfig):
        loaded = load_model(model, device)
    elif isinstance(model, PretrainedConfig):
        loaded = build_random_model(model, dtype, device, seed, init="auto")
    else:
        loaded = prepare_model(model, device)
    return LLMEngine(Worker(loaded, config), tokenizer, config)


def meta_model(
    config: PretrainedConfig, dtype: torch.dtype, tensor_parallel_size: int = 1
) -> PreTrainedModel:
    """The model (rank 0's slice with tensor parallelism) on the ``meta`` device: shapes and bytes only."""
    model = build_meta_model(config, dtype)
    if tensor_parallel_size > 1:
        slice_model(model, 0, tensor_parallel_size, None)
    return model
