"""Faults inside the engine fail only the request they hit; the others finish as if it were not there."""

import pytest
import torch

import engine.runner.model_runner as model_runner
import engine.worker as worker
from engine import SamplingParams
from engine.llm_engine import derive_seed
from tiny_models import make_llm, random_prompts, tokenizer

PROMPTS = random_prompts(6, seed=61)
GOOD = SamplingParams(temperature=0, max_new_tokens=12)
BAD_SEED = 4242


def outputs(llm, params):
    return [
        (o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].error)
        for o in llm.generate(PROMPTS, params)
    ]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_nan_logits_fail_only_that_request(mode, monkeypatch):
    llm = make_llm("llama", mode=mode)
    params = [GOOD] * 6
    params[2] = SamplingParams(temperature=0.8, seed=BAD_SEED, max_new_tokens=12)
    expected = outputs(llm, params)
    target = derive_seed(BAD_SEED, "", 0)
    real_sample = model_runner.sample
    calls = {"n": 0}

    def poisoned(logits, st, want_logprobs, mask=None):
        calls["n"] += 1
        if calls["n"] > 3:  # a few tokens in, the model starts to produce NaN for that request only
            logits = torch.where((st.seed == target)[:, None], float("nan"), logits)
        return real_sample(logits, st, want_logprobs, mask=mask)

    monkeypatch.setattr(model_runner, "sample", poisoned)
    got = outputs(llm, params)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if i == 2:
            tokens, reason, error = g
            assert reason == "error" and "NaN or inf logits" in error
            assert tokens == e[0][: len(tokens)] and len(tokens) < 12
        else:
            assert g == e


def test_exception_in_one_requests_output_processing_fails_only_that_request(monkeypatch):
    llm = make_llm("llama", tok=tokenizer())
    params = [SamplingParams(temperature=0, max_new_tokens=10, stop=["\x00never"])] * 6
    expected = outputs(llm, params)
    real_append = llm.engine.detokenizer.append

    def failing(seq):
        if seq.request_id == "4" and len(seq.output_token_ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real_append(seq)

    monkeypatch.setattr(llm.engine.detokenizer, "append", failing)
    got = outputs(llm, params)
    assert got[4][1] == "error" and "UnicodeDecodeError" in got[4][2]
    assert [g for i, g in enumerate(got) if i != 4] == [e for i, e in enumerate(expected) if i != 4]


def test_running_out_of_kv_blocks_preempts_instead_of_failing():
    llm = make_llm("llama", num_blocks=12, max_num_seqs=6)  # 11 blocks of 8 tokens for 6 growing requests
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=30))
    assert all(o.error is None and o.outputs[0].finish_reason in ("stop", "length") for o in outs)
    assert llm.engine.scheduler.num_preemptions > 0


def test_out_of_memory_at_start_names_the_settings_to_lower(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 70.00 GiB")

    monkeypatch.setattr(worker, "allocate_kv_cache", oom)
    with pytest.raises(RuntimeError, match="lower gpu_memory_utilization or num_blocks"):
        make_llm("llama")


def test_close_waits_for_the_async_loops_last_step_before_freeing_the_cache(monkeypatch):
    """The async loop launches one step ahead, so a finished run still has a step in flight; closing
    must collect it before the cache (and the graphs that point into it) is freed, or its writes
    land in memory the next engine of the process is given (seen on a GPU as a device-side assert
    in the second engine's first forward)."""
    llm = make_llm("llama", mode="async")
    engine = llm.engine
    events: list[str] = []
    collect = engine.runner.collect
    monkeypatch.setattr(
        engine.runner, "collect", lambda launched: events.append("collect") or collect(launched)
    )
    release = engine.runner.release_graphs
    monkeypatch.setattr(engine.runner, "release_graphs", lambda: events.append("release") or release())
    caches = engine.runner.kv_caches
    llm.generate(random_prompts(3, [7, 9, 5], seed=8), SamplingParams(temperature=0, max_new_tokens=6))
    assert engine._in_flight is not None  # the step launched ahead of the last one that mattered
    events.clear()
    engine.close()
    assert events == ["collect", "release"]
    assert engine._in_flight is None
    assert not caches and not engine.runner.graphs
