"""A continuous-batching LLM generation engine over transformers models, with a paged KV cache.

from engine import LLM, SamplingParams
llm = LLM("Qwen/Qwen3-0.6B", dtype="bfloat16")
outputs = llm.generate(["Hello"], SamplingParams(temperature=0.7, max_new_tokens=64))
"""

from .config import EngineConfig, ModelConfig
from .llm import LLM
from .llm_engine import EngineStats, LLMEngine
from .model_loader import ModelLoadError, build_random_model
from .outputs import CompletionOutput, RequestError, RequestOutput
from .sampling_params import SamplingParams
from .timing import RunSummary, StepRecord

__all__ = [
    "LLM",
    "LLMEngine",
    "EngineConfig",
    "ModelConfig",
    "SamplingParams",
    "CompletionOutput",
    "RequestOutput",
    "RequestError",
    "EngineStats",
    "ModelLoadError",
    "RunSummary",
    "StepRecord",
    "build_random_model",
]
