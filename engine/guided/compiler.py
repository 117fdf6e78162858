"""Constraints compiled into grammars (xgrammar), once per distinct constraint, and the tokens no constraint may use.

The library loads on the first constrained request: an engine that never sees one never imports it.
Compiled grammars are kept in an LRU cache keyed by the constraint's kind and text, bounded in
bytes, so a million rows that share a schema compile it once; ``compile`` is thread-safe, so a job can compile
a row's constraint on its request-building thread, off the engine loop.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from engine.outputs import RequestError

INSTALL_HINT = 'constrained decoding needs the grammar library: pip install -e ".[guided]" (xgrammar)'
CACHE_BYTES = 512 << 20
"""Memory the cached grammars may hold (one is a few KB to a few MB with a 152k vocabulary)."""
JSON_OBJECT_SCHEMA = '{"type": "object", "additionalProperties": true}'
"""Any JSON object: OpenAI's ``response_format={"type": "json_object"}``."""


def load_library() -> Any:
    """The xgrammar module; RequestError naming the extra when it is not installed."""
    try:
        import xgrammar
    except ImportError as exc:
        raise RequestError(f"{INSTALL_HINT} ({exc})") from None
    return xgrammar


def special_token_ids(tokenizer: Any) -> set[int]:
    """The tokens decoding drops (``skip_special_tokens``): the named special tokens and every added token
    flagged special (a chat model's tool and vision markers)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    flagged = {i for i, token in added.items() if getattr(token, "special", False)}
    return set(getattr(tokenizer, "all_special_ids", ())) | flagged


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary, with a cache.

    ``vocab_size`` is the model's (its logits' width, at least the tokenizer's); ``stop_ids`` are
    the tokens that end a sample (EOS), allowed only where the grammar is complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        self.xgr = xgr = load_library()
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)
        )
        self.vocab_size = vocab_size
        self.special_ids = sorted(special_token_ids(tokenizer) - set(stop_ids))
        self._decoded_vocab: list[bytes] = self.info.decoded_vocab
        self._usable: dict[bool, np.ndarray] = {}
        # The usable tokens are folded into the grammars: each kind of constraint compiles against a
        # vocabulary where the tokens it may not use have no text, which xgrammar never allows (as
        # it does for special tokens). The masks then need no AND per step.
        self.compilers = {
            json_text: xgr.GrammarCompiler(
                self._restricted_info(stop_ids, json_text), max_threads=2, cache_enabled=False
            )
            for json_text in (False, True)
        }
        self._cache: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self.num_compiled = 0
        """Grammars compiled (cache misses), for tests and reports."""

    def compile(self, kind: str, text: str) -> Any:
        """The compiled grammar of a constraint (``SamplingParams.constraint``); RequestError if it is invalid."""
        key = (kind, text)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key][0]
        try:
            compiled = self._compile(kind, text)
        except (RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RequestError(f"invalid {kind}: {first}") from None
        size = int(getattr(compiled, "memory_size_bytes", 0)) + len(text)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = (compiled, size)
                self._cache_bytes += size
                self.num_compiled += 1
            while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                self._cache_bytes -= self._cache.popitem(last=False)[1][1]
        return compiled

    def _restricted_info(self, stop_ids: list[int], json_text: bool) -> Any:
        """The tokenizer's vocabulary (as the bytes each token decodes to) without the tokens that
        ``usable_tokens`` excludes: theirs become empty, so no grammar compiled against it allows them."""
        usable = np.unpackbits(self.usable_tokens(json_text).view(np.uint8), bitorder="little")
        vocab = [b if usable[i] else b"" for i, b in enumerate(self._decoded_vocab)]
        return self.xgr.TokenizerInfo(
            vocab, self.xgr.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=sorted(stop_ids)
        )

    def _compile(self, kind: str, text: str) -> Any:
        if kind == "json_schema":
            json.loads(text)  # ValueError names the position of bad JSON text
            # Compact JSON: with free whitespace a model can emit blank tokens for ever.
            return self.compilers[True].compile_json_schema(text, any_whitespace=False)
        compiler = self.compilers[False]
        if kind == "regex":
            return compiler.compile_regex(text)
        if kind == "choice":
            options = json.loads(text)
            return compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
            )
        if kind == "grammar":
            return compiler.compile_grammar(text)
        raise ValueError(f"unknown constraint kind {kind!r}")

    def usable_tokens(self, json_text: bool) -> np.ndarray:
        """A bitmask (int32 words) of the tokens a constraint may use: all but the tokenizer's special
        tokens (their text is dropped from the output, so the grammar would see another text than the
        reader) and, for JSON, every token holding a control character (JSON strings must escape them,
        which xgrammar 0.2.9 does not enforce inside strings with ``maxLength``; compact JSON has none
        outside strings)."""
        if json_text in self._usable:
            return self._usable[json_text].copy()
        allowed = np.ones(self.vocab_size, dtype=bool)
        allowed[[i for i in self.special_ids if i < self.vocab_size]] = False
        if json_text:
            control = [i for i, b in enumerate(self._decoded_vocab) if any(c < 0x20 for c in b)]
            allowed[control] = False
        words = -(-self.vocab_size // 32)
        packed = np.packbits(np.pad(allowed, (0, 32 * words - self.vocab_size)), bitorder="little")
        self._usable[json_text] = packed.view(np.int32)
        return self._usable[json_text].copy()
