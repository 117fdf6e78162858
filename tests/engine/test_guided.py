"""Constrained decoding: every output satisfies its constraint (a random model: only the mask keeps it on track),
greedy equals transformers' generate with the same mask, unconstrained neighbours are untouched, async equals sync.

The constraint and transformers tests run with the real Qwen2 tokenizer (``BATCHGEN_QWEN2_TOKENIZER``, or
beside the checkout) and a tiny model of Qwen2's 151,936-token vocabulary (without it, the shipped tokenizer's
2,048); the loop's mechanics (neighbours, async, the compile cache) with the shipped tokenizer, which samples
a 2,048-token vocabulary much faster on CPU.
"""

import json
import re
import sys

import jsonschema
import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bench.json_schemas import SCHEMAS
from engine import RequestError, SamplingParams
from engine.runner.sampler import allowed_tokens
from tiny_models import (
    VOCAB,
    devices,
    large_vocab_tokenizer,
    make_llm,
    random_prompts,
    reference_model,
    tokenizer,
)

xgr = pytest.importorskip("xgrammar", reason='the grammar library: pip install -e ".[guided]"')

REGEXES = [
    r"[a-z]{3,8}@[a-z]{2,6}\.(com|org)",
    r"\d{3}-\d{4}",
    r"(yes|no|maybe)( indeed)?",
    r"[A-Z][a-z]{0,10}( [A-Z][a-z]{0,10}){0,3}",
]
CHOICES = [["positive", "negative", "neutral"], ["A", "B", "C or D", 'a "quoted" café']]
GRAMMAR = 'root ::= num (" + " num){0,3}\nnum ::= [1-9] [0-9]{0,2}'
GRAMMAR_RE = r"[1-9][0-9]{0,2}( \+ [1-9][0-9]{0,2}){0,3}"


@pytest.fixture(scope="module")
def tok_vocab():
    return large_vocab_tokenizer()


@pytest.fixture(scope="module")
def small_vocab():
    return tokenizer(), VOCAB


def guided_llm(tok_vocab, device="cpu", **options):
    tok, vocab = tok_vocab
    overrides = {"vocab_size": vocab, "eos_token_id": tok.eos_token_id}
    return make_llm("qwen2", device, tok=tok, config_overrides=overrides, **options)


def satisfied(params: SamplingParams, text: str) -> bool:
    if params.json_schema is not None:
        try:
            jsonschema.validate(json.loads(text), json.loads(params.json_schema))
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True
    if params.regex is not None:
        return re.fullmatch(params.regex, text) is not None
    if params.choice is not None:
        return text in params.choice
    return re.fullmatch(GRAMMAR_RE, text) is not None


def constrained_workload(max_new_tokens: int) -> list[SamplingParams]:
    """Each schema, regex and choice greedy and sampled, the grammar sampled twice."""
    out = []
    for kind, values in (("json_schema", list(SCHEMAS.values())), ("regex", REGEXES), ("choice", CHOICES)):
        for i, value in enumerate(values):
            out.append(SamplingParams(temperature=0, max_new_tokens=max_new_tokens, **{kind: value}))
            out.append(
                SamplingParams(temperature=1.0, seed=i, max_new_tokens=max_new_tokens, **{kind: value})
            )
    out.append(SamplingParams(temperature=0.8, n=2, seed=7, max_new_tokens=max_new_tokens, grammar=GRAMMAR))
    return out


@pytest.mark.parametrize("device", devices())
def test_every_constrained_output_satisfies_its_constraint(tok_vocab, device):
    llm = guided_llm(tok_vocab, device, num_blocks=2048, max_num_seqs=32)
    params = constrained_workload(max_new_tokens=256)
    samples = []
    # Greedy rows apart: a step with a sampled row draws noise over the whole vocabulary for every row.
    for greedy in (True, False):
        part = [p for p in params if (p.temperature == 0) == greedy]
        outputs = llm.generate(random_prompts(len(part), seed=5 + greedy), part)
        samples += [(p, c) for p, out in zip(part, outputs, strict=True) for c in out.outputs]
    assert len(samples) == sum(p.n for p in params) == 58
    assert sum(p.json_schema is not None for p, _ in samples) == 2 * len(SCHEMAS) >= 40
    truncated = [(p, c) for p, c in samples if c.finish_reason == "length"]
    for p, c in samples:
        assert c.error is None and c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == tok_vocab[0].eos_token_id  # EOS only once the constraint was complete
            assert satisfied(p, c.text), (p.constraint, c.text)
        else:
            assert len(c.token_ids) == p.max_new_tokens
    assert len(truncated) <= len(samples) // 10, [c.text[:60] for _, c in truncated]


def test_rows_that_reach_max_new_tokens_are_marked_truncated(tok_vocab):
    llm = guided_llm(tok_vocab)
    schema = {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 40}},
        "required": ["text"],
    }
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=6, json_schema=schema))
    (c,) = out.outputs
    # The grammar allows whitespace between JSON tokens, so only the document's start is fixed.
    assert c.finish_reason == "length" and len(c.token_ids) == 6 and c.text.lstrip().startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


class UsableTokens(LogitsProcessor):
    """What the engine adds to the grammar's mask: the tokens a constraint may use at all."""

    def __init__(self, usable: np.ndarray, vocab: int):
        self.forbidden = ~allowed_tokens(torch.from_numpy(usable)[None], vocab)[0]

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.forbidden, float("-inf"))


def test_greedy_constrained_output_equals_transformers_with_the_same_mask(tok_vocab):
    tok, vocab = tok_vocab
    llm = guided_llm(tok_vocab, mode="async")  # the harder path; async equals sync below
    names = ["flat_object", "nested_object", "array_of_objects", "ref_defs", "one_of", "bounded_number"]
    params = [SamplingParams(temperature=0, max_new_tokens=64, json_schema=SCHEMAS[n]) for n in names]
    params += [SamplingParams(temperature=0, max_new_tokens=64, regex=r) for r in REGEXES[:2]]
    params += [SamplingParams(temperature=0, max_new_tokens=64, choice=CHOICES[1])]
    prompts = random_prompts(len(params), seed=9)
    outputs = llm.generate(prompts, params)
    ref = reference_model(llm)
    compiler = llm.engine.guided.compiler
    for prompt, p, out in zip(prompts, params, outputs, strict=True):
        processors = LogitsProcessorList(
            [
                xgr.contrib.hf.LogitsProcessor(compiler.compile(*p.constraint)),
                UsableTokens(compiler.usable_tokens(json_text=p.json_schema is not None), vocab),
            ]
        )
        ids = torch.tensor([prompt])
        expected = ref.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=p.max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=0,
            logits_processor=processors,
        )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == expected, p.constraint


def run(llm, prompts, params):
    outs = [o for out in llm.generate(prompts, params) for o in out.outputs]
    return [(o.token_ids, o.text, o.finish_reason) for o in outs], [o.logprobs for o in outs]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_unconstrained_rows_produce_the_same_tokens_beside_constrained_ones(small_vocab, mode):
    free = [SamplingParams(temperature=0, max_new_tokens=30, logprobs=True)] * 6
    free += [SamplingParams(temperature=0.9, seed=3, n=2, max_new_tokens=25)] * 2
    free_prompts = random_prompts(len(free), seed=11)
    alone, alone_lps = run(guided_llm(small_vocab, mode=mode), free_prompts, free)
    constrained = [SamplingParams(temperature=0, max_new_tokens=40, json_schema=s) for s in SCHEMAS.values()][
        :8
    ]
    mixed_prompts, mixed_params = [], []
    for i, (prompt, p) in enumerate(zip(free_prompts, free, strict=True)):
        mixed_prompts += [prompt, random_prompts(1, seed=100 + i)[0]]
        mixed_params += [p, constrained[i]]
    llm = guided_llm(small_vocab, mode=mode)
    together, together_lps = run(llm, mixed_prompts, mixed_params)
    assert llm.engine.guided.rows_filled > 0
    got = [
        t
        for t, p in zip(together, [p for p in mixed_params for _ in range(p.n)], strict=True)
        if p.constraint is None
    ]
    lps = [
        lp
        for lp, p in zip(together_lps, [p for p in mixed_params for _ in range(p.n)], strict=True)
        if p.constraint is None
    ]
    assert got == alone
    for lp, expected in zip(lps, alone_lps, strict=True):
        assert lp == pytest.approx(expected, abs=1e-4) if expected else lp is None


@pytest.mark.parametrize("device", devices())
def test_async_matches_sync_for_constrained_rows_with_chunking_and_preemption(small_vocab, device):
    params = constrained_workload(max_new_tokens=48)
    params += [
        SamplingParams(temperature=0, max_new_tokens=60),
        SamplingParams(temperature=1, seed=2, max_new_tokens=60),
    ]
    prompts = random_prompts(len(params), seed=13)
    common = dict(num_blocks=40, max_batch_tokens=40, max_num_seqs=12)
    sync = guided_llm(small_vocab, device, mode="sync", **common)
    async_ = guided_llm(small_vocab, device, mode="async", **common)
    expected, _ = run(sync, prompts, params)
    got, _ = run(async_, prompts, params)
    assert got == expected
    assert sync.engine.scheduler.num_preemptions > 0 and async_.engine.scheduler.num_preemptions > 0
    assert async_.engine.guided.live == 0


def test_one_compile_per_distinct_constraint(small_vocab):
    llm = guided_llm(small_vocab, max_num_seqs=16)
    params = [
        SamplingParams(temperature=0.7, seed=i, max_new_tokens=24, json_schema=SCHEMAS["enum_string"])
        for i in range(40)
    ]
    params += [SamplingParams(temperature=0, max_new_tokens=24, regex=REGEXES[1])] * 10
    outputs = llm.generate(random_prompts(len(params), seed=17), params)
    assert all(o.error is None for o in outputs)
    assert llm.engine.guided.compiler.num_compiled == 2


def test_invalid_constraints_fail_at_submission_and_the_others_run(tok_vocab):
    llm = guided_llm(tok_vocab)
    bad = [
        SamplingParams(json_schema={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
        SamplingParams(json_schema="{not json"),
        SamplingParams(regex="(unclosed"),
        SamplingParams(grammar="root ::= undefined_rule"),
    ]
    good = SamplingParams(temperature=0, max_new_tokens=8, choice=["yes", "no"])
    outputs = llm.generate(random_prompts(5, seed=19), [*bad, good])
    kinds = ["json_schema", "json_schema", "regex", "grammar"]
    for out, kind in zip(outputs[:4], kinds, strict=True):
        assert out.error is not None and out.error.startswith(f"invalid {kind}: ") and not out.outputs
    assert outputs[4].error is None and outputs[4].outputs[0].text in ("yes", "no")


def test_constrained_request_without_the_library_names_the_extra(small_vocab, monkeypatch):
    llm = guided_llm(small_vocab)
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar raises ImportError
    with pytest.raises(RequestError, match=re.escape('pip install -e ".[guided]"')):
        llm.engine.add_request("r", [5, 6], SamplingParams(regex="a+"))
    llm.engine.add_request("plain", [5, 6], SamplingParams(max_new_tokens=2))  # unconstrained: unaffected
    assert llm.engine.guided is None


def test_constrained_request_without_a_tokenizer_is_refused():
    llm = make_llm("llama")
    with pytest.raises(RequestError, match="needs a tokenizer"):
        llm.engine.add_request("r", [5, 6], SamplingParams(choice=["a"]))


def test_sampling_params_take_one_constraint_at_a_time():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    p = SamplingParams(json_schema=schema)
    assert p.json_schema == json.dumps(schema) and p.constraint == ("json_schema", p.json_schema)
    assert list(json.loads(p.json_schema)["properties"]) == ["b", "a"]  # property order kept
    assert SamplingParams(choice=("x", "y")).constraint == ("choice", '["x", "y"]')
    for bad in (
        dict(regex="a", choice=["a"]),
        dict(choice=[]),
        dict(choice=["a", ""]),
        dict(regex=""),
        dict(json_schema=5),
        dict(regex="a", ignore_eos=True),
        dict(json_schema="{}", min_new_tokens=2),
        dict(grammar="root ::= [a]", think_end_ids=[3], max_think_tokens=4),
    ):
        with pytest.raises(ValueError, match="invalid SamplingParams"):
            SamplingParams(**bad)


def test_bitmask_words_unpack_to_the_allowed_tokens():
    rng = np.random.default_rng(0)
    words = rng.integers(-(2**31), 2**31, size=(3, 7), dtype=np.int64).astype(np.int32)
    expected = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :200].astype(bool)
    assert torch.equal(allowed_tokens(torch.from_numpy(words), 200), torch.from_numpy(expected))


def test_constraints_never_use_special_tokens_nor_json_raw_control_characters(tok_vocab):
    tok, vocab = tok_vocab
    llm = guided_llm(tok_vocab)
    llm.engine.compile_constraint(SamplingParams(regex="a"))
    compiler = llm.engine.guided.compiler
    tab = tok.encode("\t", add_special_tokens=False)
    assert len(tab) == 1
    specials = sorted(set(tok.all_special_ids) - {tok.eos_token_id})
    assert specials
    for json_text in (False, True):
        usable = allowed_tokens(torch.from_numpy(compiler.usable_tokens(json_text))[None], vocab)[0]
        assert not usable[specials].any() and usable[tok.eos_token_id]
        assert bool(usable[tab[0]]) is not json_text
        assert usable.sum() > 0.9 * len(tok)


def test_the_grammar_cache_is_bounded_in_bytes_least_recently_used_first(small_vocab, monkeypatch):
    from engine.guided import compiler as compiler_module

    llm = guided_llm(small_vocab)
    llm.engine.compile_constraint(SamplingParams(regex="a"))
    compiler = llm.engine.guided.compiler
    sizes = {}
    for r in ("b+", "c+", "d+"):
        before = compiler._cache_bytes
        compiler.compile("regex", r)
        sizes[r] = compiler._cache_bytes - before
    monkeypatch.setattr(compiler_module, "CACHE_BYTES", sizes["c+"] + sizes["d+"])
    compiler.compile("regex", "c+")  # used: now the most recent
    compiled = compiler.num_compiled
    compiler.compile("regex", "e+")  # evicts a and b+, the least recently used
    kept = set(compiler._cache)
    assert ("regex", "c+") in kept and ("regex", "e+") in kept
    assert not kept & {("regex", "a"), ("regex", "b+")}
    assert compiler._cache_bytes <= compiler_module.CACHE_BYTES
    compiler.compile("regex", "c+")
    assert compiler.num_compiled == compiled + 1  # c+ was kept
    compiler.compile("regex", "b+")
    assert compiler.num_compiled == compiled + 2  # b+ was not
