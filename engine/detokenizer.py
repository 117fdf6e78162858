"""Incremental detokenisation and stop-string matching."""

from __future__ import annotations

from engine.sequence import Sequence


class Detokenizer:
    """Appends each new token's text to ``seq.text`` without re-decoding the whole output.

    It decodes a short window ending at the new token and keeps only what the window adds,
    waiting while the window ends in an incomplete UTF-8 character.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def append(self, seq: Sequence) -> str:
        ids = seq.output_token_ids
        prefix = self._decode(ids[seq.detok_prefix_offset : seq.detok_read_offset])
        full = self._decode(ids[seq.detok_prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            seq.text += new
            seq.detok_prefix_offset = seq.detok_read_offset
            seq.detok_read_offset = len(ids)
            return new
        return ""

    def final_text(self, seq: Sequence) -> str:
        return self._decode(seq.output_token_ids)


def find_stop(text: str, new_len: int, stops: list[str]) -> int:
    """Index where the earliest stop string that the last ``new_len`` characters complete starts, or -1."""
    best = -1
    for stop in stops:
        start = max(0, len(text) - new_len - len(stop) + 1)
        i = text.find(stop, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best
