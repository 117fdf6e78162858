"""What the engine returns: one completion per (request, sample index), grouped per prompt by ``LLM``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class RequestError(ValueError):
    """A request the engine cannot serve (bad prompt, too long for the model or the cache)."""


@dataclass
class CompletionOutput:
    """One finished sample of one request.

    ``finish_reason`` is ``"stop"`` (EOS, a stop token id or a stop string), ``"length"``
    (max_new_tokens) or ``"error"`` (``error`` says why; the other requests are unaffected).

    With ``SamplingParams.prompt_logprobs``: ``prompt_logprobs[p]`` is the logprob of prompt token
    ``p + 1`` given the tokens before it (one entry per prompt token after the first), and for
    k > 0 ``prompt_top_logprobs[p]`` maps the k most likely tokens at that position to their
    logprobs (most likely first).

    With ``SamplingParams.top_logprobs`` = k > 0: ``top_token_ids[i]`` (int32) and ``top_logprobs[i]``
    (float32) are the k most likely tokens at generated token ``i`` and their logprobs under the raw
    distribution, most likely first, arrays of shape ``[len(token_ids), k]``. A token the engine
    forced (an end-of-thinking marker) has itself with logprob 0, then id -1 with -inf.
    """

    request_id: str
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    error: str | None = None
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[dict[int, float]] | None = None
    top_token_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


@dataclass
class RequestOutput:
    """All samples of one prompt, as ``LLM.generate`` returns them (in input order)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    error: str | None = None
