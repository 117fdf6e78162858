"""Bad prompts and sampling values give clear errors; the other requests go on."""

import re

import pytest

from engine import LLM, RequestError, SamplingParams
from tiny_models import make_config, make_llm, random_prompts, tokenizer


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"min_p": 2.0}, "min_p must be in [0, 1]"),
        ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens (9) must not exceed max_new_tokens (4)"),
        ({"stop": [""]}, "stop strings must be non-empty"),
    ],
)
def test_invalid_sampling_values_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match="invalid SamplingParams") as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


def test_bad_prompts_get_errors_and_the_others_finish():
    llm = make_llm("llama", tok=tokenizer())
    good = random_prompts(2, [5, 8], seed=31)
    too_long = list(range(3, 3 + 500))
    prompts = [good[0], "", [], too_long, [{"role": "wizard", "content": "hi"}], 42, [5, 99999], good[1]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=20))
    errors = [o.error for o in outs]
    assert errors[0] is None and errors[-1] is None
    assert all(o.outputs and o.outputs[0].token_ids for o in (outs[0], outs[-1]))
    assert "empty prompt" in errors[1]
    assert "a prompt must be" in errors[2] or "empty prompt" in errors[2]
    assert "exceeds the model's context length 512" in errors[3]
    assert "unknown role 'wizard'" in errors[4]
    assert "a prompt must be" in errors[5]
    assert "out of the vocabulary" in errors[6]


def test_request_larger_than_the_whole_cache_is_rejected_at_submission():
    llm = make_llm("llama", num_blocks=5)  # 4 usable blocks of 8 tokens
    with pytest.raises(RequestError, match="more than the whole cache"):
        llm.engine.add_request("big", list(range(3, 23)), SamplingParams(max_new_tokens=20))
    assert not llm.engine.has_unfinished_requests()


def test_unknown_llm_option_is_a_clear_error():
    with pytest.raises(TypeError, match="unknown LLM option.*max_batch_tokenz"):
        LLM(make_config("llama"), max_batch_tokenz=5)


def test_request_id_already_in_flight_is_refused():
    llm = make_llm("llama")
    llm.engine.add_request("a", [5, 6, 7], SamplingParams(n=2, max_new_tokens=3))
    with pytest.raises(RequestError, match="already in flight"):
        llm.engine.add_request("a", [8, 9], SamplingParams(max_new_tokens=3))
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    llm.engine.add_request("a", [8, 9], SamplingParams(max_new_tokens=3))  # free again once finished


def test_stop_strings_without_a_tokenizer_are_refused():
    llm = make_llm("llama")  # token ids in, token ids out: no tokenizer to find text in
    with pytest.raises(RequestError, match=r"stop strings \['a'\] need a tokenizer"):
        llm.engine.add_request("s", [5, 6, 7], SamplingParams(stop=["a"], max_new_tokens=3))
    assert not llm.engine.has_unfinished_requests()
    outs = llm.generate([[5, 6, 7]], SamplingParams(stop=["a"], max_new_tokens=3))
    assert "need a tokenizer" in outs[0].error
    llm.engine.add_request(
        "t", [5, 6, 7], SamplingParams(stop_token_ids=[9], max_new_tokens=3)
    )  # ids are fine


def test_a_model_path_that_does_not_exist_or_has_no_config_says_so(tmp_path, monkeypatch):
    from engine.build import build_engine
    from engine.model.errors import ModelLoadError

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"^no such folder: {re.escape(str(missing))}$"):
        build_engine(str(missing))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="^no such folder: ./models/llama$"):
        build_engine("./models/llama")
    with pytest.raises(ModelLoadError, match=f"^no such folder: {re.escape(str(missing))}$"):
        build_engine("llama-path", tokenizer=str(missing))  # a tokenizer path is checked the same way
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=f"^no config.json in {re.escape(str(empty))}$"):
        build_engine(str(empty))
    from engine.config import ModelConfig
    from engine.model.loader import check_paths

    for hub_id in ("Qwen/Qwen3-0.6B", "gpt2"):  # hub ids are left to transformers
        check_paths(ModelConfig(model=hub_id))
