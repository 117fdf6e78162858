"""transformers' own continuous batching (``generate_batch``) on the same model, for the benchmark's comparison."""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass

import torch

from engine.model.attention import ATTN_IMPLEMENTATION

# (label, ContinuousBatchingConfig fields) in the order tried; fields a version lacks are dropped.
CONFIGS = [
    ("transformers sync", {"use_async_batching": False, "use_cuda_graph": False}),
    ("transformers async", {"use_async_batching": True, "use_cuda_graph": False}),
    ("transformers sync + cuda graphs", {"use_async_batching": False, "use_cuda_graph": True}),
]


@dataclass
class BaselineResult:
    label: str
    wall_s: float
    generated_tokens: int
    error: str | None = None
    settings: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s and not self.error else 0.0


def _cb_config(fields: dict):
    from transformers import ContinuousBatchingConfig

    if dataclasses.is_dataclass(ContinuousBatchingConfig):
        known = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    else:
        known = set(inspect.signature(ContinuousBatchingConfig.__init__).parameters)
    kept = {k: v for k, v in fields.items() if k in known}
    return ContinuousBatchingConfig(**kept), kept


def run_transformers(
    model, requests: list[tuple[list[int], int]], label: str, fields: dict, max_new_tokens: int
) -> BaselineResult:
    """Time ``generate_batch`` on ``requests`` (each capped at ``max_new_tokens``, EOS ignored)."""
    from transformers import GenerationConfig

    inputs = [p for p, _ in requests]
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    previous = model.config._attn_implementation
    try:
        cb, kept = _cb_config(fields)
        model.set_attn_implementation("sdpa")
        model.generate_batch(inputs[:2], generation_config=gen, continuous_batching_config=cb)  # warm-up
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        outputs = model.generate_batch(inputs, generation_config=gen, continuous_batching_config=cb)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        tokens = sum(len(o.generated_tokens) for o in outputs.values())
        return BaselineResult(label, wall, tokens, settings=str(kept))
    except Exception as exc:  # a baseline that fails on this machine is reported, not fatal
        return BaselineResult(label, 0.0, 0, error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        model.set_attn_implementation(previous if previous else ATTN_IMPLEMENTATION)
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
