"""``LLM``: the engine as a one-call Python API."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq

from transformers import PretrainedConfig, PreTrainedModel

from engine.build import MODEL_OPTIONS, build_engine
from engine.config import EngineConfig
from engine.outputs import RequestError, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenization import PromptType

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    """Generate completions for many prompts at once.

    ``model`` is a local path or hub id, a loaded transformers model, or a config (the model is
    then built with random weights, drawn per parameter from ``seed``: the same weights for any
    ``tensor_parallel_size``; see ``build_random_model``). Options are :class:`ModelConfig` fields (dtype,
    trust_remote_code, revision) and :class:`EngineConfig` fields (block_size, max_batch_tokens, ...).
    """

    def __init__(self, model: str | PreTrainedModel | PretrainedConfig, tokenizer=None, **options):
        unknown = set(options) - MODEL_OPTIONS - _ENGINE_FIELDS
        if unknown:
            raise TypeError(f"unknown LLM option(s): {', '.join(sorted(unknown))}")
        engine_cfg = EngineConfig(**{k: v for k, v in options.items() if k in _ENGINE_FIELDS})
        model_opts = {k: v for k, v in options.items() if k in MODEL_OPTIONS}
        self.engine = build_engine(model, tokenizer, engine_cfg, **model_opts)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in input order. A prompt the engine rejects gets an output with ``error`` set."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        results = [RequestOutput(request_id=str(i), prompt_token_ids=[]) for i in range(len(prompts))]
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt, strict=True)):
            try:
                self.engine.add_request(str(i), prompt, p)
            except RequestError as exc:
                results[i].error = str(exc)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                result = results[int(out.request_id)]
                result.prompt_token_ids = out.prompt_token_ids
                result.outputs.append(out)
        for result in results:
            result.outputs.sort(key=lambda o: o.index)
        return results
