"""The score job's rows: a context and its continuations -> the logprob of each continuation.

A source row becomes one engine request per continuation (the context's tokens, then the
continuation's), each scoring its prompt (``prompt_logprobs``) without generating
(``max_new_tokens=0``); the row's output rows are written together once all are done, so resume,
error rows and shards work as for generation. Without a continuations column the row's whole text
is scored (every token after the first: perplexity).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa

from engine.outputs import CompletionOutput, RequestError
from engine.sampling_params import SamplingParams
from jobs.config import DataConfig, PromptConfig
from jobs.errors import JobError
from jobs.pipeline.generation_loop import GenerationLoop
from jobs.pipeline.prompts import PromptBuilder, RequestSpec, checked_text, input_columns
from jobs.pipeline.row_keys import custom_id
from jobs.pipeline.sources import SourceRow

SCORE_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("id", pa.string()),
        ("sample_index", pa.int32()),  # the continuation's index in its row
        ("row_index", pa.int64()),
        ("prompt", pa.string()),
        ("messages", pa.string()),
        ("continuation", pa.string()),
        ("logprob", pa.float64()),
        ("num_tokens", pa.int32()),
        ("is_greedy", pa.bool_()),
        ("token_ids", pa.list_(pa.int32())),
        ("token_logprobs", pa.list_(pa.float32())),
        ("top_logprobs", pa.list_(pa.map_(pa.int32(), pa.float32()))),
        ("context_tokens", pa.int32()),
        ("error", pa.string()),
        ("config_hash", pa.string()),
    ]
)
"""One row per (source row, continuation); see docs/jobs.md (job=score)."""


def score_params(top_logprobs: int) -> SamplingParams:
    """Score the prompt, generate nothing. At least the top 1 is asked for: it says whether a token is greedy."""
    return SamplingParams(temperature=0.0, max_new_tokens=0, prompt_logprobs=max(1, top_logprobs))


def score_data(data: DataConfig) -> DataConfig:
    """``data`` with the context column as the prompt column (what ``PromptBuilder`` reads)."""
    return dataclasses.replace(data, prompt_column=data.context_column or data.prompt_column)


def score_columns(prompt: PromptConfig, data: DataConfig) -> list[str]:
    """The columns the score job reads: the id, the context (or text), the continuations."""
    cols = input_columns(prompt, score_data(data))
    return cols + [data.continuations_column] if data.continuations_column else cols


class ScoreBuilder(PromptBuilder):
    """The context becomes the prompt as for generation; the continuations are tokenized on their own."""

    def __init__(self, prompt: PromptConfig, data: DataConfig, params: SamplingParams, tokenizer: Any):
        if data.continuations_column is None and prompt.chat_template:
            raise JobError(
                "job=score without data.continuations_column scores the whole text: "
                "set job.prompt.chat_template=false (or name the continuations column)"
            )
        super().__init__(prompt, score_data(data), params, tokenizer)
        self.continuations_column = data.continuations_column

    def build(self, row: SourceRow, row_id: str) -> RequestSpec:
        spec = super().build(row, row_id)
        if spec.error is not None:
            return spec
        try:
            if self.continuations_column is None:
                if len(spec.token_ids) < 2:
                    raise ValueError("the text has fewer than 2 tokens: nothing to score")
            else:
                spec.continuations = self._continuations(row.data.get(self.continuations_column))
                spec.continuation_ids = [
                    self.tokenizer.encode(c, add_special_tokens=False) for c in spec.continuations
                ]
                empty = [i for i, ids in enumerate(spec.continuation_ids) if not ids]
                if empty:
                    raise ValueError(f"continuation {empty[0]} has no tokens")
        except ValueError as e:
            spec.error = str(e)
        return spec

    def _continuations(self, value: Any) -> list[str]:
        column = self.continuations_column
        if value is None:
            raise ValueError(f"continuations column {column!r} is missing or null")
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not value:
            raise ValueError(f"continuations column {column!r} must be a text or a non-empty list of texts")
        out = []
        for i, text in enumerate(value):
            if not isinstance(text, str) or not text:
                raise ValueError(f"continuation {i} must be a non-empty text, got {text!r}")
            out.append(checked_text(text, f"continuation {i}"))
        return out


def _base(spec: RequestSpec, digest: str) -> dict[str, Any]:
    return {
        "id": spec.id,
        "row_index": spec.row_index,
        "prompt": spec.prompt,
        "messages": None if spec.messages is None else json.dumps(spec.messages, ensure_ascii=False),
        # Tokens before the first scored one: the context, or the text's first token.
        "context_tokens": min(len(spec.token_ids or ()), 1 if spec.continuations is None else 1 << 30),
        "config_hash": digest,
    }


def score_rows(
    spec: RequestSpec, outputs: list[CompletionOutput], digest: str, top: int
) -> list[dict[str, Any]]:
    """One row per continuation (one for the whole text) from the engine's prompt scores."""
    base = _base(spec, digest)
    rows = []
    for i, out in enumerate(outputs):
        n = len(out.prompt_token_ids) - 1 if spec.continuations is None else len(spec.continuation_ids[i])
        lps = out.prompt_logprobs[len(out.prompt_logprobs) - n :]
        tops = out.prompt_top_logprobs[len(out.prompt_top_logprobs) - n :]
        rows.append(
            base
            | {
                "custom_id": custom_id(spec.id, i),
                "sample_index": i,
                "continuation": None if spec.continuations is None else spec.continuations[i],
                "logprob": float(sum(lps)),
                "num_tokens": n,
                # Greedy: every token is a most likely one (its logprob is the top logprob of its position).
                "is_greedy": all(lp >= max(t.values()) for lp, t in zip(lps, tops, strict=True)),
                "token_ids": out.prompt_token_ids[len(out.prompt_token_ids) - n :],
                "token_logprobs": lps,
                "top_logprobs": [list(t.items())[:top] for t in tops] if top else None,
                "error": out.error,
            }
        )
    return rows


def score_error_rows(spec: RequestSpec, digest: str) -> list[dict[str, Any]]:
    """One error row per continuation (one when they are unknown), each carrying ``spec.error``."""
    dup = None if spec.duplicate_of is None else spec.row_index
    count = len(spec.continuations) if spec.continuations else 1
    return [
        _base(spec, digest)
        | {
            "custom_id": custom_id(spec.id, i, dup),
            "sample_index": i,
            "continuation": spec.continuations[i] if spec.continuations else None,
            "error": spec.error,
        }
        for i in range(count)
    ]


@dataclasses.dataclass(slots=True)
class _PendingScore:
    spec: RequestSpec
    outputs: list[CompletionOutput | None]
    remaining: int


class ScoreLoop(GenerationLoop):
    """The generation loop with one engine request per continuation of a row; the row is written when all are done."""

    def __init__(self, *args: Any, top_logprobs: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.top_logprobs = top_logprobs
        self._parts: dict[str, tuple[str, int]] = {}  # engine request id -> (row id, continuation index)
        self._next = 0

    def _submit(self, spec: RequestSpec) -> bool:
        prompts = (
            [spec.token_ids]
            if spec.continuations is None
            else [spec.token_ids + ids for ids in spec.continuation_ids]
        )
        entry = _PendingScore(spec, [None] * len(prompts), 0)
        for i, prompt in enumerate(prompts):
            request_id = f"score-{self._next}"
            try:
                self.engine.add_request(request_id, prompt, spec.params)
            except RequestError as e:
                # The parts already added finish first; the row is then written as an error row.
                spec.error = f"continuation {i}: {e}" if spec.continuations is not None else str(e)
                break
            self._next += 1
            self._parts[request_id] = (spec.id, i)
            entry.remaining += 1
        if entry.remaining == 0:
            return False
        self._in_flight[spec.id] = entry
        return True

    def _error_rows(self, spec: RequestSpec) -> list[dict[str, Any]]:
        return score_error_rows(spec, self.digest)

    def _collect(self, out: CompletionOutput) -> None:
        row_id, index = self._parts.pop(out.request_id)
        entry = self._in_flight[row_id]
        entry.outputs[index] = out
        entry.remaining -= 1
        if entry.remaining == 0:
            del self._in_flight[row_id]
            spec = entry.spec
            if spec.error is not None:
                rows = score_error_rows(spec, self.digest)
            else:
                rows = score_rows(spec, entry.outputs, self.digest, self.top_logprobs)
            self._finish(spec, rows)
