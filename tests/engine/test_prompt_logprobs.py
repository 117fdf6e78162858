"""Prompt scoring (``SamplingParams.prompt_logprobs``) equals log-softmax of transformers' own forward logits."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from tiny_models import VOCAB, make_llm, random_prompts, reference_model


@torch.inference_mode()
def reference_scores(ref, prompt: list[int]) -> torch.Tensor:
    """Log-softmax over the vocabulary at every prompt position but the last, shape [len - 1, vocab]."""
    logits = ref(torch.tensor([prompt], device=ref.device)).logits[0].float()
    return logits.log_softmax(-1)[:-1]


def check_against_reference(ref, prompt: list[int], out, k: int) -> None:
    lsm = reference_scores(ref, prompt)
    expected = lsm.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert len(out.prompt_logprobs) == len(prompt) - 1
    assert out.prompt_logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    if k:
        values, ids = lsm.topk(k, dim=-1)
        for p, top in enumerate(out.prompt_top_logprobs):
            assert list(top) == ids[p].tolist()
            assert list(top.values()) == pytest.approx(values[p].tolist(), abs=1e-4)
    else:
        assert out.prompt_top_logprobs is None


@pytest.mark.parametrize(("arch", "mode"), [("llama", "sync"), ("gemma2", "sync"), ("qwen2", "async")])
def test_prompt_logprobs_match_transformers_with_chunked_prefill(arch, mode):
    # max_batch_tokens=16: every prompt above 16 tokens is prefilled in chunks, several per step.
    llm = make_llm(arch, max_batch_tokens=16, mode=mode)
    ref = reference_model(llm)
    prompts = random_prompts(6, [5, 47, 23, 1, 16, 33], seed=3)
    ks = [0, 3, 1, 0, 2, 0]
    params = [SamplingParams(temperature=0, max_new_tokens=0, prompt_logprobs=k) for k in ks]
    outs = llm.generate(prompts, params)
    for prompt, k, out in zip(prompts, ks, outs, strict=True):
        (sample,) = out.outputs
        assert sample.finish_reason == "length" and sample.token_ids == [] and sample.error is None
        check_against_reference(ref, prompt, sample, k)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_used_blocks == 0


def test_scoring_beside_generation_changes_no_token():
    prompts = random_prompts(8, seed=5)
    plain = [SamplingParams(temperature=0, max_new_tokens=12, logprobs=True) for _ in prompts]
    scored = [
        SamplingParams(
            temperature=0, max_new_tokens=12, logprobs=True, prompt_logprobs=i % 3 if i % 2 else None
        )
        for i in range(len(prompts))
    ]
    expected = make_llm("llama", max_batch_tokens=24).generate(prompts, plain)
    llm = make_llm("llama", max_batch_tokens=24)
    ref = reference_model(llm)
    got = llm.generate(prompts, scored)
    for prompt, p, e, g in zip(prompts, scored, expected, got, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].logprobs == pytest.approx(e.outputs[0].logprobs, abs=1e-4)
        if p.prompt_logprobs is None:
            assert g.outputs[0].prompt_logprobs is None
        else:
            check_against_reference(ref, prompt, g.outputs[0], p.prompt_logprobs)


def test_cached_prefix_is_recomputed_for_scoring():
    llm = make_llm("llama", max_batch_tokens=32, block_size=8)
    ref = reference_model(llm)
    prefix = random_prompts(1, [40], seed=7)[0]
    # A plain request puts the prefix's blocks in the cache.
    llm.generate([prefix + [5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=2))
    bm = llm.engine.block_manager
    hits = bm.prefix_hit_blocks
    continuations = [[9, 10, 11, 12], [300, 301], [1500, 7, 99, 4, 8, 2000]]
    prompts = [prefix + c for c in continuations]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=0, prompt_logprobs=1))
    assert bm.prefix_hit_blocks == hits  # the scoring requests took no cached block
    for prompt, out in zip(prompts, outs, strict=True):
        check_against_reference(ref, prompt, out.outputs[0], 1)
    # A plain request still takes the cached prefix.
    llm.generate([prefix + [42]], SamplingParams(temperature=0, max_new_tokens=1))
    assert bm.prefix_hit_blocks > hits


def test_scoring_survives_preemption_and_n():
    llm = make_llm("llama", num_blocks=14, block_size=8, max_batch_tokens=32, max_num_seqs=8)
    ref = reference_model(llm)
    prompts = random_prompts(6, [30, 25, 33, 12, 28, 20], seed=11)
    params = SamplingParams(temperature=1.0, seed=1, n=2, max_new_tokens=14, prompt_logprobs=0)
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out.outputs) == 2
        for sample in out.outputs:
            check_against_reference(ref, prompt, sample, 0)


def test_prompt_logprobs_validation():
    assert SamplingParams(prompt_logprobs=-1).prompt_logprobs is None
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=True)
    assert VOCAB > 20
