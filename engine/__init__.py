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
    "ModelLoadError": "model.errors",
    "build_random_model": "model.loader",
    "RunSummary": "timing",
    "StepRecord": "timing",
    "validate_messages": "tokenization",
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
    from engine.config import EngineConfig, ModelConfig
    from engine.llm import LLM
    from engine.llm_engine import EngineStats, LLMEngine
    from engine.model.errors import ModelLoadError
    from engine.model.loader import build_random_model
    from engine.outputs import CompletionOutput, RequestError, RequestOutput
    from engine.sampling_params import SamplingParams
    from engine.timing import RunSummary, StepRecord
    from engine.tokenization import validate_messages
