"""The reasoning budget: after ``max_think_tokens`` tokens the end-of-thinking marker's ids are forced,
then generation goes on after them; sync and async (carry-over) give the same tokens."""

import pytest

from engine import SamplingParams
from tiny_models import make_llm, random_prompts

END = [301, 302, 303]  # the "marker": three token ids
COMMON = dict(num_blocks=60, max_batch_tokens=40, max_num_seqs=6)


def greedy(**kw):
    return SamplingParams(temperature=0, ignore_eos=True, **kw)


def tokens(llm, prompts, params):
    return [[o.token_ids for o in out.outputs] for out in llm.generate(prompts, params)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_marker_forced_at_the_budget_then_generation_continues_from_it(mode):
    llm = make_llm(mode=mode, **COMMON)
    prompt = random_prompts(1, [11], seed=3)[0]
    budget = 7
    (plain,) = tokens(llm, [prompt], greedy(max_new_tokens=30))[0]
    (forced,) = tokens(llm, [prompt], greedy(max_new_tokens=30, think_end_ids=END, max_think_tokens=budget))[
        0
    ]
    assert END not in [plain[i : i + 3] for i in range(budget)]  # the model did not close it itself
    assert forced[:budget] == plain[:budget]
    assert forced[budget : budget + len(END)] == END
    assert len(forced) == 30
    # What follows is the model's own continuation of prompt + thinking + marker.
    (cont,) = tokens(llm, [prompt + forced[: budget + 3]], greedy(max_new_tokens=30 - budget - 3))[0]
    assert forced[budget + 3 :] == cont


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_marker_the_model_emits_itself_is_not_forced_again(mode):
    llm = make_llm(mode=mode, **COMMON)
    prompt = random_prompts(1, [9], seed=5)[0]
    (plain,) = tokens(llm, [prompt], greedy(max_new_tokens=20))[0]
    marker = plain[2:4]  # closes the thinking at output position 4, before the budget of 6
    params = greedy(max_new_tokens=20, think_end_ids=marker, max_think_tokens=6)
    assert tokens(llm, [prompt], params)[0][0] == plain


def test_forced_marker_is_cut_at_max_new_tokens_and_logprobs_are_zero():
    llm = make_llm(mode="sync", **COMMON)
    prompt = random_prompts(1, [8], seed=9)[0]
    params = greedy(max_new_tokens=6, think_end_ids=END, max_think_tokens=4, logprobs=True)
    (out,) = llm.generate([prompt], params)[0].outputs
    assert out.token_ids[4:] == END[:2] and out.finish_reason == "length"
    assert out.logprobs[4:] == [0.0, 0.0] and all(lp < 0 for lp in out.logprobs[:4])


def test_async_equals_sync_with_budgets_preemption_and_n():
    prompts = random_prompts(10, seed=17)
    params = []
    for i in range(len(prompts)):
        budget = 3 + i % 5
        if i % 2:
            params.append(
                greedy(max_new_tokens=24, think_end_ids=END, max_think_tokens=budget, logprobs=True)
            )
        else:
            params.append(
                SamplingParams(
                    temperature=1.0,
                    seed=50 + i,
                    n=2,
                    max_new_tokens=20,
                    think_end_ids=END[:1],
                    max_think_tokens=budget,
                )
            )
    common = dict(num_blocks=24, max_batch_tokens=32, max_num_seqs=8)
    sync = make_llm(mode="sync", **common)
    async_ = make_llm(mode="async", **common)
    expected = tokens(sync, prompts, params)
    assert tokens(async_, prompts, params) == expected
    assert sync.engine.scheduler.num_preemptions > 0 and async_.engine.scheduler.num_preemptions > 0
    for p, outs in zip(params, expected, strict=True):
        for t in outs:
            b, end = p.max_think_tokens, p.think_end_ids
            assert t[b : b + len(end)] == end or end in [t[i : i + len(end)] for i in range(b)]


def test_budget_needs_the_marker_ids():
    with pytest.raises(ValueError, match="max_think_tokens needs think_end_ids"):
        SamplingParams(max_think_tokens=5)
    with pytest.raises(ValueError, match="max_think_tokens must be an integer >= 1"):
        SamplingParams(max_think_tokens=0, think_end_ids=[1])
