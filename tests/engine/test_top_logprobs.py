"""Top-k logprobs of generated tokens (``SamplingParams.top_logprobs``) equal ``log_softmax`` + ``topk`` of
transformers' own forward logits at every generated position, greedy and sampled, beside rows that
ask for none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import RequestError, SamplingParams
from engine.runner import model_runner
from engine.top_logprobs import NO_TOKEN, TopLogprobs
from tiny_models import make_llm, random_prompts, reference_model

ATOL = 1e-4
"""Engine and transformers compute the same float32 logits by different kernels (they differ by up to
~5e-6 here)."""
TIE = 2e-5
"""Two logprobs closer than this may come out in either order."""


@torch.inference_mode()
def reference_lsm(ref, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each generated position: ``[len(generated), vocab]``."""
    ids = torch.tensor([prompt + generated[:-1]], device=ref.device)
    return ref(ids).logits[0, len(prompt) - 1 :].float().log_softmax(-1).cpu()


def assert_top_matches(lsm: torch.Tensor, ids: np.ndarray, lps: np.ndarray, k: int, tie: float = TIE) -> int:
    """The engine's top k equal the reference's; returns the positions compared id for id.

    Ties: where two of the reference's k + 1 best logprobs lie within ``tie``, two correct
    computations may order (or, at the k-th place, choose) those tokens differently. So at every
    position the engine's j-th value must equal the reference's j-th value and its j-th id must have
    that logprob under the reference (together: a correct top k up to ties), and at positions
    without such a near-tie the ids must be the reference's exactly."""
    n = lsm.shape[0]
    assert ids.shape == lps.shape == (n, k) and ids.dtype == np.int32 and lps.dtype == np.float32
    ref_values, ref_ids = lsm.topk(min(k + 1, lsm.shape[1]), dim=-1)
    got_ids, got_lps = torch.from_numpy(ids).long(), torch.from_numpy(lps)
    torch.testing.assert_close(got_lps, ref_values[:, :k], atol=ATOL, rtol=0)
    torch.testing.assert_close(lsm.gather(1, got_ids), got_lps, atol=ATOL, rtol=0)
    assert all(len(set(row)) == k for row in ids.tolist())
    separated = (ref_values[:, :-1] - ref_values[:, 1:]).min(dim=-1).values > tie
    assert torch.equal(got_ids[separated], ref_ids[separated, :k])
    return int(separated.sum())


def params_for(k: int, sampled: bool, seed: int) -> SamplingParams:
    """Greedy, or seeded sampling through every filter and the min_new_tokens suppression (none of
    which the top logprobs see: they are the raw distribution's)."""
    if not sampled:
        return SamplingParams(temperature=0, max_new_tokens=12, top_logprobs=k, logprobs=True)
    return SamplingParams(
        temperature=0.8,
        top_k=40,
        top_p=0.9,
        min_p=0.02,
        min_new_tokens=6,
        seed=seed,
        n=2,
        max_new_tokens=12,
        top_logprobs=k,
        logprobs=True,
    )


ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize(
    ("device", "mode", "sampled"),
    [
        ("cpu", "sync", False),
        ("cpu", "async", False),
        ("cpu", "async", True),
        # CUDA graphs (the flag in the graph key), the fused sampler and the async loop
        pytest.param("cuda", "async", False, marks=ON_CUDA),
        pytest.param("cuda", "async", True, marks=ON_CUDA),
    ],
)
def test_top_logprobs_match_transformers_at_every_generated_position(device, mode, sampled):
    llm = make_llm("llama", device, mode=mode, max_top_logprobs=100, max_batch_tokens=48, max_num_seqs=8)
    tie = TIE if device == "cpu" else 10 * TIE  # other kernels, other roundings
    ref = reference_model(llm)
    prompts = random_prompts(6, [5, 33, 17, 1, 26, 12], seed=4)
    ks = [1, 20, 100, 0, 100, 20]  # a row asking for none shares the steps of those that ask
    outs = llm.generate(prompts, [params_for(k, sampled, seed=i) for i, k in enumerate(ks)])
    exact = compared = 0
    for prompt, k, out in zip(prompts, ks, outs, strict=True):
        for sample in out.outputs:
            assert sample.error is None and (sampled or len(sample.token_ids) == 12)
            if k == 0:
                assert sample.top_token_ids is None and sample.top_logprobs is None
                continue
            lsm = reference_lsm(ref, prompt, sample.token_ids)
            exact += assert_top_matches(lsm, sample.top_token_ids, sample.top_logprobs, k, tie)
            compared += len(sample.token_ids)
            chosen = lsm.gather(1, torch.tensor(sample.token_ids)[:, None]).squeeze(1)
            assert sample.logprobs == pytest.approx(chosen.tolist(), abs=ATOL)
            if not sampled:  # greedy: the chosen token is the top one, with the very same logprob
                assert sample.top_token_ids[:, 0].tolist() == sample.token_ids
                assert sample.top_logprobs[:, 0].tolist() == pytest.approx(sample.logprobs, abs=1e-5)
    # Most positions are compared id for id (near-ties come with k = 100; on CUDA the tie window is
    # ten times wider, so fewer positions are clear of one).
    assert exact >= (0.8 if device == "cpu" else 0.6) * compared
    if device == "cuda":
        assert any(
            key[5] for key in llm.engine.runner.graphs
        )  # steps asking replayed a graph of their own (key: top)
    if sampled:  # the chosen tokens are sampled: some are not the raw distribution's top one
        assert any(
            s.token_ids != s.top_token_ids[:, 0].tolist()
            for o in outs
            for s in o.outputs
            if s.top_token_ids is not None
        )


def test_asking_for_top_logprobs_changes_no_token_and_steps_without_them_skip_the_work(monkeypatch):
    calls = []
    real = model_runner.top_logprobs
    monkeypatch.setattr(model_runner, "top_logprobs", lambda *a: calls.append(a[1].shape) or real(*a))
    prompts = random_prompts(5, seed=8)
    plain = [SamplingParams(temperature=0.9, seed=i, max_new_tokens=10, logprobs=True) for i in range(5)]
    llm = make_llm("llama", max_top_logprobs=7)
    expected = llm.generate(prompts, plain)
    assert calls == []  # no row asked: no step computed alternatives
    asking = [
        SamplingParams(temperature=0.9, seed=i, max_new_tokens=10, logprobs=True, top_logprobs=3)
        for i in range(5)
    ]
    got = llm.generate(prompts, asking)
    assert calls and all(shape[1] == 7 for shape in calls)  # the engine's fixed width, every row
    for e, g in zip(expected, got, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert g.outputs[0].logprobs == e.outputs[0].logprobs
        assert g.outputs[0].top_token_ids.shape == (10, 3)


def test_top_logprobs_survive_preemption():
    # 20 usable blocks of 8 tokens for 6 samples that each grow to ~50 tokens: some are preempted and recomputed.
    llm = make_llm("llama", num_blocks=21, max_num_seqs=8, max_top_logprobs=5)
    ref = reference_model(llm)
    prompts = random_prompts(6, [30, 25, 35, 20, 28, 33], seed=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, top_logprobs=5))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        (sample,) = out.outputs
        lsm = reference_lsm(ref, prompt, sample.token_ids)
        assert_top_matches(lsm, sample.top_token_ids, sample.top_logprobs, 5)


def test_a_forced_marker_is_a_point_mass_in_the_top_logprobs():
    llm = make_llm(mode="async", max_top_logprobs=4)
    end = [301, 302, 303]
    params = SamplingParams(
        temperature=0,
        ignore_eos=True,
        max_new_tokens=12,
        think_end_ids=end,
        max_think_tokens=5,
        top_logprobs=4,
    )
    (out,) = llm.generate(random_prompts(1, [11], seed=3), params)[0].outputs
    assert out.token_ids[5:8] == end and out.top_token_ids.shape == (12, 4)
    assert out.top_token_ids[5:8, 0].tolist() == end and (out.top_token_ids[5:8, 1:] == NO_TOKEN).all()
    assert (out.top_logprobs[5:8, 0] == 0).all() and np.isneginf(out.top_logprobs[5:8, 1:]).all()
    assert (out.top_logprobs[8:] < 0).all() and out.top_token_ids[8:, 0].tolist() == out.token_ids[8:]


def test_k_above_the_engine_limit_is_refused_naming_the_limit_and_the_key():
    llm = make_llm("llama", max_top_logprobs=20)
    with pytest.raises(RequestError, match=r"top_logprobs=21 exceeds .* limit of 20 .*max_top_logprobs"):
        llm.engine.add_request("a", [5, 6, 7], SamplingParams(top_logprobs=21))
    assert not llm.engine.has_unfinished_requests()
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(top_logprobs=21, max_new_tokens=2))
    assert "EngineConfig.max_top_logprobs (engine.max_top_logprobs in a job) to at least 21" in out.error
    big = make_llm("llama", max_top_logprobs=5000)
    with pytest.raises(RequestError, match="vocabulary of 2048"):
        big.engine.add_request("b", [5], SamplingParams(top_logprobs=2049))
    with pytest.raises(ValueError, match="top_logprobs must be an integer >= 0"):
        SamplingParams(top_logprobs=-1)
    with pytest.raises(ValueError, match="max_top_logprobs"):
        make_llm("llama", max_top_logprobs=-1)


def test_rows_grow_without_per_token_objects_and_stop_at_max_new_tokens():
    top = TopLogprobs(k=3, max_rows=40)
    for i in range(37):
        top.append(np.arange(i, i + 8, dtype=np.int32), -np.arange(8, dtype=np.float32) - i)
    ids, lps = top.arrays()
    assert ids.shape == lps.shape == (37, 3) and len(top.ids) == 40  # doubled 16 -> 32, then capped at 40
    assert ids[36].tolist() == [36, 37, 38] and lps[2].tolist() == [-2.0, -3.0, -4.0]
