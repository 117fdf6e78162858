"""A continuous-batching LLM generation engine over transformers models, with a paged KV cache.

    from engine import LLM, SamplingParams
    llm = LLM("Qwen/Qwen3-0.6B", dtype="bfloat16")
    outputs = llm.generate(["Hello"], SamplingParams(temperature=0.7, max_new_tokens=64))

Names load on first use, so importing the plain config types (``engine.config``,
``engine.sampling_params``) does not pull in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LLM": "llm",
    "LLMEngine": "llm_engine",
    "EngineStats": "llm_engine",
    "EngineConfig": "config",
    "ModelConfig": "config",
    "SamplingParams": "sampling_params",
    "CompletionOutput": "outputs",
    "RequestOutput": "outputs",
    "RequestError": "outputs",
    "ModelLoadError": "model_loader",
    "build_random_model": "model_loader",
    "RunSummary": "timing",
    "StepRecord": "timing",
    "validate_messages": "prompts",
}

__all__ = [
    "LLM",
    "LLMEngine",
    "EngineStats",
    "EngineConfig",
    "ModelConfig",
    "SamplingParams",
    "CompletionOutput",
    "RequestOutput",
    "RequestError",
    "ModelLoadError",
    "build_random_model",
    "RunSummary",
    "StepRecord",
    "validate_messages",
]
assert set(__all__) == set(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .config import EngineConfig, ModelConfig
    from .llm import LLM
    from .llm_engine import EngineStats, LLMEngine
    from .model_loader import ModelLoadError, build_random_model
    from .outputs import CompletionOutput, RequestError, RequestOutput
    from .prompts import validate_messages
    from .sampling_params import SamplingParams
    from .timing import RunSummary, StepRecord
