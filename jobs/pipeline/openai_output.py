"""OpenAI batch output files (``output.jsonl``, ``errors.jsonl``) written from a complete run's committed rows.

One line per request (source row), in input order (``row_index``): a request whose samples all
finished is a response line in ``output.jsonl`` with a ``chat.completion`` (``/v1/chat/completions``)
or ``text_completion`` (``/v1/completions``) body; any other is an error line in ``errors.jsonl``.
Identifiers are derived from the config hash and the row, so rewriting the files gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

from jobs.pipeline.atomic import commit_file
from jobs.pipeline.manifest import GENERATIONS_DIR, MANIFEST_NAME, Manifest

log = logging.getLogger(__name__)

OUTPUT_NAME = "output.jsonl"
ERRORS_NAME = "errors.jsonl"
COLUMNS = [
    "id",
    "sample_index",
    "row_index",
    "messages",
    "completion",
    "reasoning",
    "token_ids",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "logprobs",
    "top_token_ids",
    "top_logprobs",
    "sampling",
    "error",
    "config_hash",
]
# Errors of lines that have no custom_id to answer with (not JSON, not an object, or no custom_id).
NO_CUSTOM_ID = ("invalid JSON", "invalid UTF-8", "expected a JSON object", "id column 'custom_id' is null")
READ_ROWS = 1024  # rows taken from the sorted index at a time


def _digest(*parts: object, size: int = 12) -> str:
    return hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=size).hexdigest()


def error_code(message: str) -> str:
    """An OpenAI-style error code for a row's error message."""
    if message.startswith("unsupported url"):
        return "invalid_url"
    if message.startswith("model "):
        return "model_not_found"
    if "NaN or inf logits" in message or message.startswith("row cannot be stored"):
        return "server_error"
    return "invalid_request"


class TokenText:
    """Each generated token's text and bytes, for logprobs (byte-level BPE tokens exactly, others decoded alone)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        try:
            from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

            self._bytes = {c: b for b, c in bytes_to_unicode().items()}
        except ImportError:  # pragma: no cover - transformers always has it
            self._bytes = {}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._piece(token_id)
        return hit

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        tok = self.tokenizer.convert_ids_to_tokens(token_id)
        if tok is not None and self._bytes and all(c in self._bytes for c in tok):
            raw = bytes(self._bytes[c] for c in tok)
            if token_id not in getattr(self.tokenizer, "all_special_ids", ()):
                return raw.decode("utf-8", errors="replace"), raw
        text = self.tokenizer.decode([token_id])
        return text, text.encode("utf-8")


@dataclass
class OpenAIBatchOutput:
    """The final step of ``job=openai_batch``: ``output.jsonl`` and ``errors.jsonl`` from the committed rows.

    ``tokenizer`` is called (once) only when a request asked for logprobs: token texts need it. The top
    alternatives (``top_logprobs``) are those the request asked for, as OpenAI gives them (chat: a list
    of ``{token, logprob, bytes}`` per token; completions: a mapping of token text to logprob).
    """

    served_model: str
    tokenizer: Callable[[], Any]
    files: tuple[str, ...] = (OUTPUT_NAME, ERRORS_NAME)
    counts: dict[str, int] = field(default_factory=dict)
    _token_text: TokenText | None = None

    def write(self, out_dir: Path) -> None:
        """Write both files atomically (each a temp file, fsync, rename)."""
        counts = {OUTPUT_NAME: 0, ERRORS_NAME: 0}

        def write_both(errors: BinaryIO) -> None:
            def write_output(output: BinaryIO) -> None:
                for name, line in self.lines(out_dir):
                    (output if name == OUTPUT_NAME else errors).write(line)
                    counts[name] += 1

            commit_file(out_dir / OUTPUT_NAME, write_output, kind="openai")

        commit_file(out_dir / ERRORS_NAME, write_both, kind="openai")
        self.counts = counts
        log.info(
            "wrote %d responses to %s and %d errors to %s",
            counts[OUTPUT_NAME],
            out_dir / OUTPUT_NAME,
            counts[ERRORS_NAME],
            out_dir / ERRORS_NAME,
        )

    def lines(self, out_dir: Path) -> Iterator[tuple[str, bytes]]:
        """(file name, JSON line) of each request, in input order."""
        for rows, created in _requests(out_dir):
            obj = self.line(rows, created)
            name = ERRORS_NAME if obj["error"] is not None else OUTPUT_NAME
            yield name, (json.dumps(obj, ensure_ascii=False) + "\n").encode()

    def line(self, rows: list[dict[str, Any]], created: int) -> dict[str, Any]:
        """The batch output line of one request (its rows sorted by sample index)."""
        first = rows[0]
        key = (first["config_hash"], first["row_index"], first["id"])
        line: dict[str, Any] = {"id": f"batch_req_{_digest(*key)}", "custom_id": first["id"]}
        error = next((r["error"] for r in rows if r["error"] is not None), None)
        if error is not None:
            if first["id"] == f"row-{first['row_index']}" and error.startswith(NO_CUSTOM_ID):
                line["custom_id"] = None  # a line that is not a request, or one without a custom_id
            return line | {"response": None, "error": {"code": error_code(error), "message": error}}
        body = self._body(rows, created, key)
        response = {"status_code": 200, "request_id": f"req_{_digest('req', *key)}", "body": body}
        return line | {"response": response, "error": None}

    def _body(self, rows: list[dict[str, Any]], created: int, key: tuple) -> dict[str, Any]:
        chat = rows[0]["messages"] is not None
        choices = [self._chat_choice(r) if chat else self._text_choice(r) for r in rows]
        prompt_tokens = rows[0]["prompt_tokens"] or 0
        completion_tokens = sum(r["completion_tokens"] or 0 for r in rows)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{_digest('body', *key)}",
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": self.served_model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": f"fp_{rows[0]['config_hash'][:12]}",
        }

    def _chat_choice(self, row: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": row["completion"]}
        if row["reasoning"] is not None:
            message["reasoning_content"] = row["reasoning"]
        logprobs = None
        if row["sampling"]["logprobs"] and row["logprobs"] is not None:
            content = []
            for i, (token_id, lp) in enumerate(zip(row["token_ids"], row["logprobs"], strict=True)):
                top = [self._token(t, t_lp) for t, t_lp in _alternatives(row, i)]
                content.append(self._token(token_id, lp) | {"top_logprobs": top})
            logprobs = {"content": content, "refusal": None}
        return {
            "index": row["sample_index"],
            "message": message,
            "logprobs": logprobs,
            "finish_reason": row["finish_reason"],
        }

    def _text_choice(self, row: dict[str, Any]) -> dict[str, Any]:
        logprobs = None
        if row["sampling"]["logprobs"] and row["logprobs"] is not None:
            tokens, offsets, offset = [], [], 0
            for token_id in row["token_ids"]:
                text, _ = self._text(token_id)
                tokens.append(text)
                offsets.append(offset)
                offset += len(text)
            logprobs = {
                "tokens": tokens,
                "token_logprobs": list(row["logprobs"]),
                "top_logprobs": [
                    {self._text(t)[0]: t_lp for t, t_lp in _alternatives(row, i)} for i in range(len(tokens))
                ],
                "text_offset": offsets,
            }
        return {
            "index": row["sample_index"],
            "text": row["completion"],  # the text as generated: completions requests are not split
            "logprobs": logprobs,
            "finish_reason": row["finish_reason"],
        }

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        """A chat logprobs entry: the token's text, its logprob and its bytes."""
        text, raw = self._text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def _text(self, token_id: int) -> tuple[str, bytes]:
        if self._token_text is None:
            self._token_text = TokenText(self.tokenizer())
        return self._token_text(token_id)


def _alternatives(row: dict[str, Any], i: int) -> list[tuple[int, float]]:
    """Generated token ``i``'s top alternatives (id, logprob), most likely first; none unless the request
    asked (``top_logprobs``), and none that does not exist (after a forced token)."""
    ids = row["top_token_ids"]
    if ids is None:
        return []
    return [(t, lp) for t, lp in zip(ids[i], row["top_logprobs"][i], strict=True) if t >= 0]


def _requests(out_dir: Path) -> Iterator[tuple[list[dict[str, Any]], int]]:
    """Each request's rows (sorted by sample index) with its chunk's commit time, in source order.

    Chunks are memory-mapped and only an index (row, sample, position) is sorted; rows are taken
    ``READ_ROWS`` at a time."""
    manifest = Manifest.load(out_dir / MANIFEST_NAME)
    if manifest is None:
        return
    tables, created = [], []
    for entry in manifest.chunks:
        path = out_dir / GENERATIONS_DIR / entry.file
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        tables.append(table.select(COLUMNS))
        created.append(pa.array([int(path.stat().st_mtime)] * table.num_rows, pa.int64()))
    if not tables:
        return
    table = pa.concat_tables(tables).append_column("created", pa.chunked_array(created, pa.int64()))
    order = pc.sort_indices(table, sort_keys=[("row_index", "ascending"), ("sample_index", "ascending")])
    group: list[dict[str, Any]] = []
    for start in range(0, len(order), READ_ROWS):
        for row in table.take(order[start : start + READ_ROWS]).to_pylist():
            if group and row["row_index"] != group[0]["row_index"]:
                yield group, group[0]["created"]
                group = []
            group.append(row)
    if group:
        yield group, group[0]["created"]
