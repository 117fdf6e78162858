"""Stopping: EOS, stop token ids, stop strings, min_new_tokens and ignore_eos, with the right finish reasons."""

import pytest

from engine import SamplingParams
from tiny_models import make_llm, random_prompts, tokenizer

PROMPT = random_prompts(1, [9], seed=21)[0]


def _first_new_token_index(tokens: list[int], start: int) -> int:
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.fixture(scope="module")
def free_run():
    llm = make_llm("llama")
    return llm.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=30))[0].outputs[0].token_ids


def test_eos_from_the_model_config_stops_generation(free_run):
    k = _first_new_token_index(free_run, 4)
    llm = make_llm("llama", config_overrides={"eos_token_id": free_run[k]})
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=30))[0].outputs[0]
    assert out.token_ids == free_run[: k + 1]
    assert out.finish_reason == "stop"


def test_stop_token_ids_stop_generation(free_run):
    k = _first_new_token_index(free_run, 6)
    llm = make_llm("llama")
    out = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=[free_run[k]])
    )
    assert out[0].outputs[0].token_ids == free_run[: k + 1]
    assert out[0].outputs[0].finish_reason == "stop"


def test_max_new_tokens_gives_length(free_run):
    out = make_llm("llama").generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=7))[0].outputs[0]
    assert out.token_ids == free_run[:7]
    assert out.finish_reason == "length"


def test_min_new_tokens_suppresses_eos(free_run):
    k = _first_new_token_index(free_run, 2)
    llm = make_llm("llama", config_overrides={"eos_token_id": free_run[k]})
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=30, min_new_tokens=k + 5))[
        0
    ].outputs[0]
    assert out.token_ids[:k] == free_run[:k]
    assert free_run[k] not in out.token_ids[: k + 5]
    assert len(out.token_ids) >= k + 5


def test_ignore_eos_runs_to_max_new_tokens(free_run):
    k = _first_new_token_index(free_run, 3)
    llm = make_llm("llama", config_overrides={"eos_token_id": free_run[k]})
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))[
        0
    ].outputs[0]
    assert out.token_ids == free_run
    assert out.finish_reason == "length"


def test_stop_string_spanning_several_tokens_cuts_the_text():
    tok = tokenizer()
    llm = make_llm("llama", tok=tok)
    prompt = "The quick brown fox"
    free = llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=40))[0].outputs[0]
    # A stop string made of the text of tokens 5..7, so that no single token completes it.
    piece = tok.decode(free.token_ids[5:8], skip_special_tokens=True)
    assert len(piece) >= 2 and all(tok.decode([t]) != piece for t in free.token_ids)
    cut = free.text.find(piece)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=40, stop=[piece, "\x00never"]))[
        0
    ]
    sample = out.outputs[0]
    assert sample.finish_reason == "stop"
    assert sample.text == free.text[:cut]
    assert piece not in sample.text
    assert sample.token_ids == free.token_ids[: len(sample.token_ids)]
    assert piece in tok.decode(sample.token_ids, skip_special_tokens=True)
    assert piece not in tok.decode(sample.token_ids[:-1], skip_special_tokens=True)
