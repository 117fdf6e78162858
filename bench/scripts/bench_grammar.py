"""Grammar libraries compared on this machine's CPU with a real tokenizer: xgrammar, llguidance, outlines-core.

For each library and each schema of ``bench.json_schemas.SCHEMAS``: the compile time (first use of the
schema), then random walks through the grammar (each step fills the token mask, picks a random allowed
token, advances the matcher) that give the per-token mask time, and whether each finished document
validates against its schema (``jsonschema``): a schema counts as covered when it compiles and every walk
validates. Compact JSON (no free whitespace) for every library, as the engine compiles it.

    python -m bench.scripts.bench_grammar --tokenizer /path/to/qwen2-tokenizer [--walks 5]

Needs ``pip install xgrammar llguidance outlines-core jsonschema`` (a library that is missing is skipped).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jsonschema
import numpy as np

from bench.json_schemas import SCHEMAS

MAX_TOKENS = 300


@dataclass
class SchemaResult:
    name: str
    compile_s: float | None = None
    error: str | None = None
    valid_walks: int = 0
    walks: int = 0
    mask_s: list[float] = field(default_factory=list)


class Library:
    """One library behind four calls: compile a schema, start a matcher, fill a bitmask, accept a token."""

    name = ""

    def compile(self, schema: dict): ...
    def matcher(self, compiled): ...
    def fill(self, matcher, bitmask: np.ndarray) -> None: ...
    def accept(self, matcher, token: int) -> bool: ...
    def done(self, matcher) -> bool: ...


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tok, vocab_size: int, eos: list[int]):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask):
        matcher.fill_next_token_bitmask(bitmask)

    def accept(self, matcher, token):
        return matcher.accept_token(token)

    def done(self, matcher):
        return matcher.is_terminated()


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tok, vocab_size: int, eos: list[int]):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab_size, eos_token=eos[0])

    def compile(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        matcher = self.llg.LLMatcher(self.tok, grammar)  # llguidance compiles lazily: the first matcher
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tok, compiled)

    def fill(self, matcher, bitmask):
        import torch

        self.llg.torch.fill_next_token_bitmask(matcher, torch.from_numpy(bitmask), 0)

    def accept(self, matcher, token):
        return matcher.consume_token(token)

    def done(self, matcher):
        return matcher.is_stopped()


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tok, vocab_size: int, eos: list[int]):
        import outlines_core
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.oc = outlines_core
        decode = {c: b for b, c in bytes_to_unicode().items()}
        special = set(tok.all_special_ids)
        tokens: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab().items():
            if i in special:
                continue
            tokens.setdefault(bytes(decode[c] for c in text), []).append(i)
        self.vocab = outlines_core.Vocabulary(eos[0], tokens)
        self.eos = eos[0]

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, bitmask):
        matcher.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

    def accept(self, matcher, token):
        matcher.advance(token)
        return True

    def done(self, matcher):
        return matcher.is_finished()


def allowed_tokens(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def walk(
    lib: Library, compiled, tok, vocab_size: int, eos: list[int], rng: random.Random, result: SchemaResult
) -> str | None:
    """One random walk: the document it generated, or None if it did not finish within MAX_TOKENS."""
    matcher = lib.matcher(compiled)
    bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
    out: list[int] = []
    for _ in range(MAX_TOKENS):
        start = time.perf_counter()
        lib.fill(matcher, bitmask)
        result.mask_s.append(time.perf_counter() - start)
        allowed = allowed_tokens(bitmask[0], vocab_size)
        token = int(allowed[rng.randrange(len(allowed))])
        if not lib.accept(matcher, token):
            raise RuntimeError(f"{lib.name} refused token {token} that its own mask allowed")
        if token not in eos:
            out.append(token)
        if lib.done(matcher):  # after the stop token, or (llguidance) once nothing else can follow
            return tok.decode(out)
    return None


def run_library(
    make: Callable[[], Library], tok, vocab_size: int, eos: list[int], walks: int
) -> tuple[str, float, list]:
    start = time.perf_counter()
    lib = make()
    init_s = time.perf_counter() - start
    results = []
    for name, schema in SCHEMAS.items():
        r = SchemaResult(name)
        results.append(r)
        try:
            start = time.perf_counter()
            compiled = lib.compile(schema)
            r.compile_s = time.perf_counter() - start
        except Exception as exc:
            r.error = f"{type(exc).__name__}: {str(exc)[:80]}"
            continue
        rng = random.Random(0)
        for _ in range(walks):
            r.walks += 1
            try:
                text = walk(lib, compiled, tok, vocab_size, eos, rng, r)
                if text is not None:
                    jsonschema.validate(json.loads(text), schema)
                    r.valid_walks += 1
            except (jsonschema.ValidationError, json.JSONDecodeError, RuntimeError) as exc:
                r.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return lib.name, init_s, results


def report(name: str, init_s: float, results: list[SchemaResult]) -> None:
    compiled = [r for r in results if r.compile_s is not None]
    covered = [r for r in compiled if r.walks and r.valid_walks == r.walks]
    masks = [t for r in results for t in r.mask_s]
    compile_ms = [1000 * r.compile_s for r in compiled]
    print(
        f"{name:14s} tokenizer {init_s:6.2f}s  compiled {len(compiled)}/{len(results)}  "
        f"covered {len(covered)}/{len(results)}  compile ms median {statistics.median(compile_ms):8.1f} "
        f"max {max(compile_ms):8.1f}  mask us median {1e6 * statistics.median(masks):7.1f} "
        f"p99 {1e6 * float(np.percentile(masks, 99)):8.1f}",
        flush=True,
    )
    for r in results:
        if r.error or r.valid_walks < r.walks:
            print(f"    {r.name}: {r.valid_walks}/{r.walks} walks valid; {r.error}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer folder")
    parser.add_argument(
        "--vocab-size", type=int, default=151936, help="the model's vocabulary (>= the tokenizer's)"
    )
    parser.add_argument("--walks", type=int, default=5, help="random walks per schema")
    parser.add_argument("--libraries", default="xgrammar,llguidance,outlines-core")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    eos = [tok.eos_token_id]
    libraries = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines-core": OutlinesCore}
    for name in args.libraries.split(","):
        try:
            report(
                *run_library(
                    lambda n=name: libraries[n](tok, args.vocab_size, eos),
                    tok,
                    args.vocab_size,
                    eos,
                    args.walks,
                )
            )
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")


if __name__ == "__main__":
    main()
