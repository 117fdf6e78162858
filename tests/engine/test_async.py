"""The async loop (one step ahead, carry-over, lagged output processing) equals the sync loop token for token."""

import pytest
import torch

from engine import SamplingParams
from tiny_models import devices, make_llm, random_prompts, tokenizer


def mixed_workload():
    prompts = random_prompts(14, seed=41) + ["The quick brown fox", "Once upon a time"]
    params = []
    for i in range(len(prompts)):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(temperature=0, max_new_tokens=5 + 3 * i, logprobs=True))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, n=2, max_new_tokens=20))
        elif kind == 2:
            params.append(
                SamplingParams(
                    temperature=1.0,
                    top_k=20,
                    min_new_tokens=4,
                    max_new_tokens=25 - i // 2,
                    stop_token_ids=[17, 300, 1200, 1500],
                )
            )
        else:
            params.append(
                SamplingParams(temperature=0.7, min_p=0.05, n=3, max_new_tokens=30, stop=["e", "th"])
            )
    return prompts, params


def run(llm, prompts, params):
    """Outputs as comparable tuples, logprobs apart (batch composition moves float32 sums by an ulp)."""
    outs = [o for out in llm.generate(prompts, params) for o in out.outputs]
    return [(o.token_ids, o.text, o.finish_reason) for o in outs], [o.logprobs or [] for o in outs]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_async_matches_sync_with_chunking_preemption_stops_and_n(arch, device):
    prompts, params = mixed_workload()
    common = dict(tok=tokenizer(), num_blocks=40, max_batch_tokens=48, max_num_seqs=12)
    sync = make_llm(arch, device, mode="sync", **common)
    async_ = make_llm(arch, device, mode="async", **common)
    expected, expected_logprobs = run(sync, prompts, params)
    got, logprobs = run(async_, prompts, params)
    assert got == expected
    for lp, expected_lp in zip(logprobs, expected_logprobs, strict=True):
        assert lp == pytest.approx(expected_lp, abs=1e-4)
    assert async_.engine.scheduler.num_preemptions > 0 and sync.engine.scheduler.num_preemptions > 0
    reasons = {r for (_, _, r) in expected}
    assert {"stop", "length"} <= reasons


@pytest.mark.parametrize("device", devices())
def test_requests_finished_in_step_n_emit_nothing_from_step_n_plus_1(device):
    llm = make_llm("llama", device, mode="async")
    prompts = random_prompts(8, seed=42)
    free = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24))
    # Stop each request at the first new token of its free run, at different steps.
    stops = [
        next(
            t
            for j, t in enumerate(o.outputs[0].token_ids)
            if j >= 2 + i and t not in o.outputs[0].token_ids[:j]
        )
        for i, o in enumerate(free)
    ]
    params = [SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[s]) for s in stops]
    outs = llm.generate(prompts, params)
    for out, ref, stop in zip(outs, free, stops, strict=True):
        tokens = out.outputs[0].token_ids
        assert tokens[-1] == stop and stop not in tokens[:-1]
        assert tokens == ref.outputs[0].token_ids[: len(tokens)]
        assert out.outputs[0].finish_reason == "stop"


def test_carry_over_fills_every_placeholder_with_the_right_token():
    """Each step's device-side input ids, after carry-over, equal the tokens the sequences really have."""
    llm = make_llm("llama", mode="async", num_blocks=30, max_batch_tokens=40, max_num_seqs=6)
    engine, runner = llm.engine, llm.engine.runner
    seen = []
    batches = []
    launch, schedule = runner.launch, engine.scheduler.schedule
    engine.scheduler.schedule = lambda: batches.append(schedule()) or batches[-1]

    def spy(arrays):
        launched = launch(arrays)
        slot, prev = runner.slots[launched.slot], runner.slots[launched.slot ^ 1]
        n = arrays.num_tokens
        carry = torch.from_numpy(arrays.carry)
        ids = torch.where(carry >= 0, prev.dev_tokens[carry.clamp(min=0)], torch.from_numpy(arrays.input_ids))
        assert torch.equal(
            slot.dev_int[slot.offsets["input_ids"] : slot.offsets["input_ids"] + n],
            torch.from_numpy(arrays.input_ids),
        )
        batch = batches[-1]
        seen.append(
            (
                [(it.seq, it.start, it.num_new_tokens) for it in batch.items],
                ids.tolist(),
                int((carry >= 0).sum()),
            )
        )
        return launched

    runner.launch = spy
    prompts = random_prompts(10, seed=43)
    params = [SamplingParams(temperature=0.8, seed=i, max_new_tokens=6 + 2 * i) for i in range(10)]
    llm.generate(prompts, params)
    assert sum(c for _, _, c in seen) > 50, "the workload should carry many tokens over"
    assert engine.scheduler.num_preemptions > 0
    for items, ids, _ in seen:
        offset = 0
        for seq, start, n in items:
            if seq.finish_reason is not None and start + n > seq.num_known_tokens:
                offset += n  # a token computed one step past the finish: discarded
                continue
            assert ids[offset : offset + n] == seq.known_tokens(start, start + n)
            offset += n


def test_collector_holds_the_objects_of_before_generation_only_while_requests_run():
    """The step loop keeps the garbage collector's full collections off the objects that existed when
    generation started (``gc.freeze``) and hands them back once the engine is idle, or closed."""
    import gc

    llm = make_llm("llama", mode="async")
    engine = llm.engine
    gc.unfreeze()  # whatever an engine left mid-run by an earlier test holds
    engine.add_request("a", random_prompts(1, seed=44)[0], SamplingParams(temperature=0, max_new_tokens=5))
    engine.step()
    assert gc.get_freeze_count() > 0
    while engine.has_unfinished_requests():
        engine.step()
    assert gc.get_freeze_count() == 0
    engine.add_request("b", random_prompts(1, seed=45)[0], SamplingParams(temperature=0, max_new_tokens=5))
    engine.step()
    assert gc.get_freeze_count() > 0
    engine.close()  # closed mid-run
    assert gc.get_freeze_count() == 0
