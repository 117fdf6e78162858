"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_PROMPT_LOGPROBS = 20
"""Most top alternatives ``prompt_logprobs`` can ask for each prompt token."""


@dataclass
class SamplingParams:
    """How to sample one prompt's completions.

    ``temperature == 0`` means greedy decoding. ``top_k <= 0``, ``top_p == 1`` and ``min_p == 0``
    disable those filters. Logprobs, when asked, are those of the model's own distribution
    (log-softmax of the raw logits) for each chosen token.

    ``top_logprobs = k`` (0: off) returns, for every generated token, the ``k`` most likely token ids
    and their logprobs under the model's raw distribution: the log-softmax of the raw logits, before
    temperature, the suppression of stop ids (``min_new_tokens``) and the top-k / top-p / min-p
    filters, whatever was sampled. ``k`` may not exceed the engine's ``max_top_logprobs``.

    ``prompt_logprobs`` scores the prompt: ``None`` (or -1) off; ``0`` the logprob of each prompt
    token after the first given the tokens before it; ``k`` > 0 also the ``k`` most likely tokens
    at each of those positions (at most ``MAX_PROMPT_LOGPROBS``). Such a request computes its whole
    prompt (it takes no blocks from the prefix cache). ``max_new_tokens=0`` (only with
    ``prompt_logprobs``) scores without generating: the request finishes after its prefill.

    Reasoning budget: with ``max_think_tokens`` set, a sample that has generated that many tokens
    without ending with ``think_end_ids`` (the end-of-thinking marker's token ids) gets those ids
    appended as known tokens (logprob 0.0 each when logprobs are asked), and generation goes on
    after them for the answer. They count towards ``max_new_tokens``. The marker is detected by its
    token ids, not by the text.

    Constrained (guided) decoding, at most one of: ``json_schema`` (a JSON Schema, as a mapping or
    its JSON text; a mapping is turned into its text), ``regex`` (the whole completion matches it),
    ``choice`` (the completion is one of these texts) or ``grammar`` (an EBNF grammar whose rule
    ``root`` is the completion). Each token is sampled among those the constraint allows; EOS is
    allowed only once the constraint is complete, so a sample ends with ``"stop"`` when it is, or
    with ``"length"`` at ``max_new_tokens`` (truncated). Needs the ``guided`` extra (xgrammar).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    think_end_ids: list[int] = field(default_factory=list)
    max_think_tokens: int | None = None
    json_schema: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    @property
    def constraint(self) -> tuple[str, str] | None:
        """``(kind, text)`` of the constraint (kind: json_schema, regex, choice, grammar), or None.

        A choice's text is the JSON list of its options."""
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice, ensure_ascii=False)
        if self.grammar is not None:
            return "grammar", self.grammar
        return None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.prompt_logprobs == -1:
            self.prompt_logprobs = None
        self.think_end_ids = [int(t) for t in self.think_end_ids]
        problems = []
        if not isinstance(self.n, int) or self.n < 1:
            problems.append(f"n must be an integer >= 1, got {self.n!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int):
            problems.append(f"top_k must be an integer, got {self.top_k!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed must be an integer or None, got {self.seed!r}")
        if (
            not isinstance(self.top_logprobs, int)
            or isinstance(self.top_logprobs, bool)
            or self.top_logprobs < 0
        ):
            problems.append(f"top_logprobs must be an integer >= 0 (0: off), got {self.top_logprobs!r}")
        scoring = self.prompt_logprobs is not None
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int)
            or isinstance(self.prompt_logprobs, bool)
            or not 0 <= self.prompt_logprobs <= MAX_PROMPT_LOGPROBS
        ):
            problems.append(
                f"prompt_logprobs must be None, -1 (off) or an integer in [0, {MAX_PROMPT_LOGPROBS}], "
                f"got {self.prompt_logprobs!r}"
            )
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < (0 if scoring else 1):
            problems.append(
                f"max_new_tokens must be an integer >= 1 (>= 0 with prompt_logprobs), got {self.max_new_tokens!r}"
            )
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            problems.append(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        elif isinstance(self.max_new_tokens, int) and self.min_new_tokens > self.max_new_tokens:
            problems.append(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be >= 0, got {self.stop_token_ids!r}")
        if self.max_think_tokens is not None:
            if not isinstance(self.max_think_tokens, int) or self.max_think_tokens < 1:
                problems.append(
                    f"max_think_tokens must be an integer >= 1 or None, got {self.max_think_tokens!r}"
                )
            elif not self.think_end_ids:
                problems.append(
                    "max_think_tokens needs think_end_ids (the end-of-thinking marker's token ids)"
                )
        if any(t < 0 for t in self.think_end_ids):
            problems.append(f"think_end_ids must be >= 0, got {self.think_end_ids!r}")
        problems += self._constraint_problems()
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    def _constraint_problems(self) -> list[str]:
        if isinstance(self.json_schema, dict | bool):
            self.json_schema = json.dumps(self.json_schema, ensure_ascii=False)
        if self.choice is not None and not isinstance(self.choice, str):
            self.choice = list(self.choice)
        given = [n for n in ("json_schema", "regex", "choice", "grammar") if getattr(self, n) is not None]
        problems = []
        if len(given) > 1:
            problems.append(
                f"give at most one of json_schema, regex, choice and grammar, got {', '.join(given)}"
            )
        for name in ("json_schema", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                what = (
                    "a JSON Schema (a mapping or its JSON text)"
                    if name == "json_schema"
                    else "a non-empty string"
                )
                problems.append(f"{name} must be {what}, got {value!r}")
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            problems.append(f"choice must be a non-empty list of non-empty strings, got {self.choice!r}")
        if given:
            clashes = [
                f"{name}={getattr(self, name)!r}"
                for name, off in (("min_new_tokens", 0), ("ignore_eos", False), ("max_think_tokens", None))
                if getattr(self, name) != off
            ]
            if clashes:
                problems.append(
                    f"{given[0]} ends the sample when the constraint is complete: it cannot be combined with "
                    + ", ".join(clashes)
                )
        return problems


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
