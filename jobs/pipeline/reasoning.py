"""Reasoning models: the thinking span of a completion, split from the answer at the markers."""

from __future__ import annotations


def split_reasoning(text: str, start: str, end: str, prompt: str | None = None) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a completion; reasoning is None when the completion does not think.

    The thinking is open when the prompt ends with ``start`` (a chat template that opens it) or the
    completion begins with it (after blanks, which are dropped with it). Open thinking runs to the
    first ``end``: the reasoning is the text before it, the answer the text after it, both exactly
    as generated (``start + reasoning + end + answer`` is the completion, less leading blanks).
    Thinking that never ends (the tokens ran out) is all reasoning, with an empty answer.
    """
    opened = prompt is not None and prompt.rstrip().endswith(start)
    body = text
    if text.lstrip().startswith(start):
        body, opened = text.lstrip()[len(start) :], True
    if not opened:
        return None, text
    reasoning, found, answer = body.partition(end)
    return reasoning, answer if found else ""
