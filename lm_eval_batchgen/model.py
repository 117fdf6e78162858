"""The ``batchgen`` model of lm-evaluation-harness: its three request types over our engine.

Each call gets all of a task's requests at once and adds them all to the engine, which runs them
through continuous batching (there is no batch size: ``--batch_size`` is accepted and ignored).
Tokenization follows lm-eval's ``hf`` backend (``TemplateLM``: context and continuation encoded
together then split, an empty context scored after the prefix token, rolling windows for
``loglikelihood_rolling``), so the two backends score the same tokens.

- ``loglikelihood``: one scoring request per (context, continuation): ``prompt_logprobs=1``,
  ``max_new_tokens=0``; the sum of the continuation tokens' logprobs, and whether each is a most
  likely token at its position.
- ``loglikelihood_rolling``: the same over lm-eval's disjoint rolling windows of ``max_length``.
- ``generate_until``: one request per context with the task's ``until`` stop strings (plus EOS),
  ``max_gen_toks`` and sampling settings (greedy unless ``do_sample``).
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from engine.config import EngineConfig, ModelConfig
from engine.outputs import CompletionOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_ENGINE_FIELDS = {f for f in EngineConfig.__dataclass_fields__}
_MODEL_FIELDS = {f for f in ModelConfig.__dataclass_fields__} - {"model", "tokenizer", "dtype"}
_IGNORED = {"batch_size", "max_batch_size"}  # lm-eval passes these; continuous batching sizes its own batches
_SCORE = SamplingParams(temperature=0.0, max_new_tokens=0, prompt_logprobs=1)


@register_model("batchgen")
class BatchgenLM(TemplateLM):
    """``--model batchgen --model_args pretrained=<path or hub id>,dtype=bfloat16[,option=value ...]``.

    Options: ``tokenizer``, ``dtype`` (default ``auto``), ``max_length`` (default the model's
    context length), ``max_gen_toks`` (256), ``add_bos_token``, ``prefix_token_id``, any
    :class:`EngineConfig` field (``max_num_seqs``, ``max_batch_tokens``, ``tensor_parallel_size``,
    ``gpu_memory_utilization``, ``seed``, ...) and :class:`ModelConfig` field (``revision``,
    ``trust_remote_code``). ``device`` (from ``--device``) picks the engine's device.
    """

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        dtype: str = "auto",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        device: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        from engine.build import build_engine

        unknown = set(options) - _ENGINE_FIELDS - _MODEL_FIELDS - _IGNORED
        if unknown:
            raise TypeError(f"batchgen: unknown model_args: {', '.join(sorted(unknown))}")
        engine_opts = {k: v for k, v in options.items() if k in _ENGINE_FIELDS}
        if device is not None and "device" not in engine_opts:
            import torch

            # lm-eval's command line asks for cuda:0 unless told otherwise: keep the engine's choice without CUDA.
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                log.warning("batchgen: device %s is not available; the engine picks its own", device)
            elif str(device).startswith("cuda") and int(options.get("tensor_parallel_size", 1)) > 1:
                engine_opts["device"] = "cuda"  # rank r on GPU r
            else:
                engine_opts["device"] = str(device)
        model_opts = {k: v for k, v in options.items() if k in _MODEL_FIELDS}
        self.engine = build_engine(
            pretrained, tokenizer, EngineConfig(**engine_opts), dtype=dtype, **model_opts
        )
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("batchgen: the model needs a tokenizer (pass tokenizer=<path>)")
        self._max_length = int(max_length) if max_length else self.engine.max_model_len
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.pretrained = pretrained
        self._next_id = 0

    # -- what lm-eval reads -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": str(self.pretrained), "engine": str(self.engine.config)}

    # -- the engine ---------------------------------------------------------------------------
    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[CompletionOutput]:
        """All ``prompts`` through the engine at once; outputs in input order."""
        ids = {}
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            request_id = f"lm-eval-{self._next_id}"
            self._next_id += 1
            ids[request_id] = i
            self.engine.add_request(request_id, prompt, p)
        outs: list[CompletionOutput | None] = [None] * len(prompts)
        engine = self.engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                outs[ids[out.request_id]] = out
        return outs

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        prompts, counts = [], []
        for _, context_enc, continuation_enc in requests:
            # The model sees at most max_length tokens (lm-eval's hf backend: max_length + 1, the last unread).
            prompt = (context_enc + continuation_enc)[-self.max_length :]
            prompts.append(prompt)
            counts.append(min(len(continuation_enc), len(prompt) - 1))
        results = []
        for (key, _, _), out, n in zip(
            requests, self._run(prompts, [_SCORE] * len(prompts)), counts, strict=True
        ):
            if out.error is not None:
                raise RuntimeError(f"batchgen: scoring {key!r} failed: {out.error}")
            lps = out.prompt_logprobs[len(out.prompt_logprobs) - n :]
            tops = out.prompt_top_logprobs[len(out.prompt_top_logprobs) - n :]
            answer = (float(sum(lps)), all(lp >= max(t.values()) for lp, t in zip(lps, tops, strict=True)))
            results.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            if max_gen_toks >= self.max_length:
                raise ValueError(
                    f"batchgen: max_gen_toks ({max_gen_toks}) must be less than max_length ({self.max_length})"
                )
            prompts.append(self.tok_encode(context)[-(self.max_length - max_gen_toks) :])
            params.append(
                SamplingParams(
                    temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                    top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                    top_k=int(kwargs.get("top_k", 0) or 0),
                    seed=kwargs.get("seed"),
                    max_new_tokens=max_gen_toks,
                    stop=[s for s in until if s],
                )
            )
            stops.append(until)
        results = []
        for req, out, until in zip(requests, self._run(prompts, params), stops, strict=True):
            if out.error is not None:
                raise RuntimeError(f"batchgen: generation failed: {out.error}")
            text = postprocess_generated_text(generation=out.text, stop=until, think_end_token=None)
            results.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results
