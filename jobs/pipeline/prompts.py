"""From a source row to an engine request: the prompt (raw text or chat template), its token ids and sampling."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.sampling_params import SamplingParams
from engine.tokenization import validate_messages
from jobs.config import DataConfig, PromptConfig, ReasoningConfig, SourceFormat
from jobs.errors import JobError
from jobs.pipeline.field_types import field_types
from jobs.pipeline.row_keys import duplicate_error
from jobs.pipeline.sources import CHAT_TEMPLATE_KWARGS_COLUMN, COMPLETIONS_URL, SourceRow


@dataclass(slots=True)
class RequestSpec:
    """What the runner sends to the engine for one source row, or the error that keeps it from being sent."""

    id: str
    row_index: int
    params: SamplingParams
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    token_ids: list[int] | None = None
    error: str | None = None
    duplicate_of: int | None = None  # the source row that has this id first (this row is then an error)
    continuations: list[str] | None = None  # the score job: texts scored after the prompt
    continuation_ids: list[list[int]] | None = None  # and their token ids
    reasoning: tuple[str, str] | None = None  # (start, end) markers: split the thinking from the answer


def template_fields(template: str) -> list[str]:
    """The field names a ``str.format`` template uses (``{topic}`` -> ``topic``)."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            root = name.split(".")[0].split("[")[0]
            if not root or root.isdigit():
                raise JobError(f"job.prompt.template must use named fields like {{topic}}, got {template!r}")
            names.append(root)
    return list(dict.fromkeys(names))


def input_columns(prompt: PromptConfig, data: DataConfig) -> list[str]:
    """Source columns a job reads (the id column, then the template fields or the prompt/messages columns)."""
    cols = [data.id_column] if data.id_column else []
    if prompt.template is not None:
        cols += template_fields(prompt.template)
    else:
        cols += [c for c in (data.messages_column, data.prompt_column) if c]
        if not (data.messages_column or data.prompt_column):
            raise JobError("set data.prompt_column, data.messages_column or job.prompt.template")
    if data.json_schema_column:
        cols.append(data.json_schema_column)
    if data.messages_column and not prompt.chat_template and prompt.template is None:
        raise JobError(
            "chat messages need the chat template: job.prompt.chat_template=false cannot be used with data.messages_column"
        )
    return list(dict.fromkeys(cols))


def check_columns(needed: list[str], available: list[str] | None, description: str) -> None:
    """Fail at start, naming the column, when the source lacks one the job needs."""
    if available is None:
        return
    missing = [c for c in needed if c not in available]
    if missing:
        raise JobError(
            f"{description} has no column {', '.join(map(repr, missing))} (columns: {', '.join(available)})"
        )


class PromptBuilder:
    """Turns source rows into ``RequestSpec``s with the tokenizer (and its chat template)."""

    def __init__(
        self,
        prompt: PromptConfig,
        data: DataConfig,
        params: SamplingParams,
        tokenizer: Any,
        reasoning: ReasoningConfig | None = None,
    ) -> None:
        self.cfg = prompt
        self.data = data
        self.params = params
        self.tokenizer = tokenizer
        self.reasoning = reasoning if reasoning and (reasoning.split or reasoning.max_tokens) else None
        self._end_ids: list[int] = []
        if self.reasoning is not None and self.reasoning.max_tokens is not None:
            self._end_ids = list(tokenizer.encode(self.reasoning.end, add_special_tokens=False))
            if not self._end_ids:
                raise JobError(f"job.reasoning.end {self.reasoning.end!r} encodes to no tokens")
        uses_chat = prompt.chat_template or (data.messages_column is not None and prompt.template is None)
        if uses_chat and not getattr(tokenizer, "chat_template", None):
            raise JobError(
                "the model's tokenizer has no chat template; set job.prompt.chat_template=false for raw text"
            )

    def row_id(self, row: SourceRow) -> str:
        """The row's stable id: its id column value, or its index in the source."""
        if self.data.id_column is None:
            return str(row.index)
        value = row.data.get(self.data.id_column)
        if value is None:
            return f"row-{row.index}"
        # Ids are stored as text, never used as paths; lone surrogates (JSON "\\ud800") are escaped.
        return str(value).encode("utf-8", "backslashreplace").decode("utf-8")

    def duplicate(self, row: SourceRow, row_id: str, first_row: int) -> RequestSpec:
        """The error request of a row whose id the source row ``first_row`` of this shard has already."""
        return RequestSpec(
            id=row_id,
            row_index=row.index,
            params=self.params,
            error=duplicate_error(first_row),
            duplicate_of=first_row,
        )

    def build(self, row: SourceRow, row_id: str) -> RequestSpec:
        """The request for ``row`` (``error`` set, and no tokens, when the row cannot be used)."""
        spec = RequestSpec(id=row_id, row_index=row.index, params=self.params)
        sampling = row.sampling
        schema_column = self.data.json_schema_column
        if schema_column is not None and row.data.get(schema_column) is not None:
            sampling = sampling | {"json_schema": row.data[schema_column]}
        if sampling:
            try:
                spec.params = dataclasses.replace(self.params, **sampling)
                check_sampling_types(spec.params, sampling)
            except (TypeError, ValueError) as e:
                spec.params = self.params  # the row's own values cannot be stored either
                spec.error = f"bad sampling fields {_short(sampling)}: {e}"
                return spec
        if row.error is not None:
            spec.error = row.error
        elif self.data.id_column is not None and row.data.get(self.data.id_column) is None:
            spec.error = f"id column {self.data.id_column!r} is null"
        else:
            try:
                self._fill_prompt(spec, row.data)
            except ValueError as e:
                spec.error = str(e)
            except Exception as e:  # a chat template may raise anything (jinja errors, KeyError, ...)
                spec.error = f"cannot render the chat template: {type(e).__name__}: {e}"
        if spec.error is None and self.reasoning is not None:
            self._reasoning(spec, split=row.data.get("endpoint") != COMPLETIONS_URL)
        return spec

    def _reasoning(self, spec: RequestSpec, split: bool) -> None:
        """Markers to split the completion at (not for raw completions requests, whose text is kept whole);
        the thinking budget unless the prompt closed the thinking."""
        r = self.reasoning
        spec.reasoning = (r.start, r.end) if split else None
        closed = spec.prompt is not None and spec.prompt.rstrip().endswith(r.end)
        if r.max_tokens is not None and not closed:
            spec.params = dataclasses.replace(
                spec.params, think_end_ids=self._end_ids, max_think_tokens=r.max_tokens
            )

    def _template_kwargs(self, data: dict[str, Any]) -> dict[str, Any]:
        """The job's ``chat_template_kwargs`` with the row's own (a mapping, or its JSON text) over them."""
        own = data.get(CHAT_TEMPLATE_KWARGS_COLUMN)
        if isinstance(own, str):
            try:
                own = json.loads(own)
            except json.JSONDecodeError as e:
                raise ValueError(f"chat_template_kwargs is not JSON: {e}") from None
        if own is not None and not isinstance(own, dict):
            raise ValueError(f"chat_template_kwargs must be a mapping, got {type(own).__name__}")
        return dict(self.cfg.chat_template_kwargs) | (own or {})

    def _fill_prompt(self, spec: RequestSpec, data: dict[str, Any]) -> None:
        completions = data.get("endpoint") == COMPLETIONS_URL  # an OpenAI /v1/completions request: raw text
        messages = data.get(self.data.messages_column) if self.data.messages_column else None
        if self.cfg.template is None and messages is not None and not completions:
            spec.messages = self._checked_messages(messages)
        else:
            if completions and self.cfg.template is None:
                data = data | {self.data.prompt_column or "prompt": self._completion_prompt(spec, data)}
                if spec.token_ids is not None:
                    return
            text = self._text(data)
            if not self.cfg.chat_template or completions:
                spec.prompt = text
                spec.token_ids = self.tokenizer.encode(text, add_special_tokens=True)
                return
            spec.messages = [{"role": "user", "content": text}]
        if self.cfg.system is not None and spec.messages[0]["role"] != "system":
            spec.messages.insert(0, {"role": "system", "content": self.cfg.system})
        spec.prompt = self.tokenizer.apply_chat_template(
            spec.messages, tokenize=False, add_generation_prompt=True, **self._template_kwargs(data)
        )
        spec.token_ids = self.tokenizer.encode(spec.prompt, add_special_tokens=False)

    def _completion_prompt(self, spec: RequestSpec, data: dict[str, Any]) -> Any:
        """A completions request's prompt: text (or a list of one text), or token ids (set on ``spec``)."""
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError("prompt must be a text or a list of token ids (one prompt per request)")
            spec.token_ids = list(prompt)
            spec.prompt = self.tokenizer.decode(prompt)
        return prompt

    def _text(self, data: dict[str, Any]) -> str:
        if self.cfg.template is not None:
            for name in template_fields(self.cfg.template):
                if data.get(name) is None:
                    raise ValueError(f"template field {name!r} is missing or null")
            text = self.cfg.template.format_map(data)
        else:
            column = self.data.prompt_column
            if column is None:
                raise ValueError(f"messages column {self.data.messages_column!r} is missing or null")
            text = data.get(column)
            if text is None:
                raise ValueError(f"prompt column {column!r} is missing or null")
            if isinstance(text, bytes):  # a binary column: text only if it is UTF-8
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"prompt column {column!r} is not valid UTF-8: {e}") from None
            if not isinstance(text, str):
                raise ValueError(f"prompt column {column!r} must be text, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("prompt is empty")
        return checked_text(text, "prompt")

    def _checked_messages(self, messages: Any) -> list[dict[str, Any]]:
        if not isinstance(messages, list):
            raise ValueError(f"messages must be a list of {{role, content}}, got {type(messages).__name__}")
        validate_messages(messages)  # the engine's own check; RequestError is a ValueError
        out = [
            {"role": m["role"], "content": checked_text(m["content"], f"message {i}")}
            for i, m in enumerate(messages)
        ]
        if self.cfg.drop_trailing_assistant and out[-1]["role"] == "assistant":
            out.pop()
        if all(not m["content"].strip() for m in out if m["role"] not in ("system", "developer")):
            raise ValueError("messages have no content to answer")
        return out


def _short(sampling: dict[str, Any], limit: int = 300) -> str:
    text = repr(sampling)
    return text if len(text) <= limit else text[:limit] + "...}"


FIRST_ROWS_CHECKED = 32


def error_reason(error: str) -> str:
    """A row's error without where it happened (``at <file>:<line>``) or other numbers."""
    return re.sub(r"\d+", "N", re.sub(r" at \S+:\d+", "", error))


def check_first_rows(rows: Iterable[SourceRow], data: DataConfig, description: str) -> None:
    """JobError when the first ``FIRST_ROWS_CHECKED`` rows (all, if fewer) cannot be read as rows of this
    format for the same reason (a plain JSON Lines file read as an OpenAI batch file, an unsupported request
    field on every line): the run would write only error rows. A bad row here and there is an error row."""
    errors = []
    for row in itertools.islice(rows, FIRST_ROWS_CHECKED):
        if row.error is None:
            return
        errors.append(row.error)
    if not errors or len({error_reason(e) for e in errors}) > 1:
        return
    first = (
        f"the first {len(errors)} rows of {description}"
        if len(errors) > 1
        else f"the only row of {description}"
    )
    if data.format is SourceFormat.openai_batch and "has no 'body' object" in errors[0]:
        raise JobError(
            f"{first} are not OpenAI batch requests ({errors[0]}): each line of a batch file is "
            '{"custom_id": ..., "body": {"messages" | "prompt": ...}}. For plain JSON Lines use data=jsonl '
            "(with data.prompt_column or data.messages_column, and data.id_column)"
        )
    raise JobError(
        f"{first} cannot be read as data={data.format.value} rows, all for the same reason: {errors[0]}. "
        "The run would write only error rows: check the data group and data.path"
    )


def checked_text(text: str, what: str) -> str:
    """``text`` if it can be stored as UTF-8; ValueError for lone surrogates (such as JSON's ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: {e.reason} at position {e.start}") from None
    return text


_SAMPLING_TYPES = field_types(SamplingParams)


def check_sampling_types(params: SamplingParams, names: Any) -> None:
    """TypeError unless the per-row sampling fields ``names`` of ``params`` have their declared types (so they can be stored)."""
    for name in names:
        (kind, stored), value = _SAMPLING_TYPES[name], getattr(params, name)
        if not stored.check(value):
            raise TypeError(f"{name} must be {kind}, got {value!r}")
