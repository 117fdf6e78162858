"""Seeded sampling: reproducible per request, independent of the batch, distributed as specified."""

import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from engine import SamplingParams
from engine.runner.sampler import SamplingTensors, sample
from tiny_models import make_llm, random_prompts


def test_seeded_request_is_identical_alone_and_in_a_batch_of_16():
    llm = make_llm("llama")
    prompts = random_prompts(16, seed=11)
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_new_tokens=20)
    alone = llm.generate([prompts[0]], target)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.5 + 0.1 * i, max_new_tokens=5 + i, seed=i) for i in range(15)]
    batch = llm.generate(prompts, [target, *others])
    assert batch[0].outputs[0].token_ids == alone
    # Unseeded requests derive their seed from the engine seed and the request id: reproducible too.
    again = llm.generate(prompts, [target, *others])
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in batch]


def test_different_seeds_give_different_samples():
    llm = make_llm("llama")
    prompt = random_prompts(1, [10], seed=12)
    outs = [
        llm.generate(prompt, SamplingParams(temperature=1.0, seed=s, max_new_tokens=16))[0]
        .outputs[0]
        .token_ids
        for s in range(4)
    ]
    assert len({tuple(o) for o in outs}) == 4


def test_top_k_one_equals_greedy():
    llm = make_llm("qwen3")
    prompts = random_prompts(5, seed=13)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    top1 = llm.generate(prompts, SamplingParams(temperature=1.3, top_k=1, seed=5, max_new_tokens=12))
    assert [o.outputs[0].token_ids for o in top1] == [o.outputs[0].token_ids for o in greedy]


def _reference_probs(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    scores = logits[None].clone()
    for warper in (
        TemperatureLogitsWarper(temperature),
        TopKLogitsWarper(top_k) if top_k > 0 else None,
        TopPLogitsWarper(top_p) if top_p < 1 else None,
        MinPLogitsWarper(min_p) if min_p > 0 else None,
    ):
        if warper is not None:
            scores = warper(None, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.5, 4, 1.0, 0.0), (1.0, 0, 1.0, 0.1), (0.8, 6, 0.8, 0.05)],
)
def test_sampler_distribution_matches_reference(temperature, top_k, top_p, min_p):
    """20,000 draws (seed varies): each token's frequency within 5 standard errors of transformers' warpers."""
    logits = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0])
    n = 20_000
    st = SamplingTensors(
        temperature=torch.full((n,), temperature),
        top_k=torch.full((n,), top_k),
        top_p=torch.full((n,), top_p),
        min_p=torch.full((n,), min_p),
        seed=torch.arange(n) * 7919 + 3,
        position=torch.full((n,), 5),
        suppress=torch.empty((n, 0), dtype=torch.int64),
        any_sampling=True,
        any_top_k_top_p=top_k > 0 or top_p < 1,
        any_min_p=min_p > 0,
    )
    tokens, _ = sample(logits.expand(n, -1).clone(), st, want_logprobs=False)
    freq = torch.bincount(tokens, minlength=len(logits)).double() / n
    expected = _reference_probs(logits, temperature, top_k, top_p, min_p).double()
    stderr = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * stderr + 1e-3), (freq, expected)
    assert torch.all(freq[expected == 0] == 0)


def test_draws_depend_only_on_seed_and_position():
    logits = torch.randn(3, 100)

    def st(seeds, positions):
        k = len(seeds)
        return SamplingTensors(
            torch.ones(k),
            torch.zeros(k, dtype=torch.int64),
            torch.ones(k),
            torch.zeros(k),
            torch.tensor(seeds),
            torch.tensor(positions),
            torch.empty((k, 0), dtype=torch.int64),
            True,
            False,
            False,
        )

    together, _ = sample(logits, st([1, 2, 3], [10, 11, 12]), False)
    for i, (s, p) in enumerate([(1, 10), (2, 11), (3, 12)]):
        alone, _ = sample(logits[i : i + 1], st([s], [p]), False)
        assert alone.item() == together[i].item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_captured_up_front_for_a_sampling_change_no_token():
    """``capture_graphs_for`` captures a sampled run's graphs at every size before its first step; the
    run samples what a run capturing them step by step samples."""
    params = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=12, seed=3, ignore_eos=True)
    prompts = random_prompts(40, seed=4)
    outputs = []
    for up_front in (False, True):
        llm = make_llm(device="cuda", max_num_seqs=16)
        engine, runner = llm.engine, llm.engine.runner
        before = len(runner.graphs)
        if up_front:
            assert engine.capture_graphs_for(params) > 0
            assert len(runner.graphs) == before + 2 * len(runner.graph_sizes)
            captured = len(runner.graphs)
        outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        if up_front:
            assert len(runner.graphs) == captured  # no step captured another
    assert outputs[0] == outputs[1]


def test_capturing_graphs_for_a_sampling_is_a_no_op_without_graphs():
    llm = make_llm()
    assert llm.engine.capture_graphs_for(SamplingParams(temperature=1.0)) == 0.0
