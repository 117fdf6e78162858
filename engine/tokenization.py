"""Turn a prompt (text, token ids or chat messages) into token ids, with clear errors."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from engine.outputs import RequestError

PromptType = str | list[int] | list[dict]
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def validate_messages(messages: Seq) -> None:
    if not messages:
        raise RequestError("empty prompt: the chat has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RequestError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r:.200}")
        if m["role"] not in CHAT_ROLES:
            raise RequestError(
                f"chat message {i} has unknown role {m['role']!r} (expected one of {sorted(CHAT_ROLES)})"
            )
        if not isinstance(m["content"], str):
            raise RequestError(
                f"chat message {i} content must be a string, got {type(m['content']).__name__}"
            )


def tokenize_prompt(prompt: PromptType, tokenizer, vocab_size: int) -> list[int]:
    """Token ids of ``prompt``; chat messages are rendered with the tokenizer's chat template."""
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("empty prompt")
        if tokenizer is None:
            raise RequestError("a text prompt needs a tokenizer; pass token ids instead")
        ids = tokenizer(prompt).input_ids
    elif isinstance(prompt, Seq) and prompt and all(isinstance(m, dict) for m in prompt):
        validate_messages(prompt)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise RequestError("chat messages need a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    elif isinstance(prompt, Seq) and not isinstance(prompt, (bytes, bytearray)):
        if any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise RequestError("a prompt must be a string, a list of token ids or a list of chat messages")
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"token ids out of the vocabulary (size {vocab_size}): {bad[:5]}")
    else:
        raise RequestError(
            f"a prompt must be a string, token ids or chat messages, got {type(prompt).__name__}"
        )
    if not ids:
        raise RequestError("empty prompt: it has no tokens")
    return ids
