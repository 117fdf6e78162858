"""What the engine returns: one completion per (request, sample index), grouped per prompt by ``LLM``."""

from __future__ import annotations

from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request the engine cannot serve (bad prompt, too long for the model or the cache)."""


@dataclass
class CompletionOutput:
    """One finished sample of one request.

    ``finish_reason`` is ``"stop"`` (EOS, a stop token id or a stop string), ``"length"``
    (max_new_tokens) or ``"error"`` (``error`` says why; the other requests are unaffected).
    """

    request_id: str
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    error: str | None = None


@dataclass
class RequestOutput:
    """All samples of one prompt, as ``LLM.generate`` returns them (in input order)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    error: str | None = None
