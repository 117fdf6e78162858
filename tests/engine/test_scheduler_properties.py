"""Block allocator and scheduler invariants under random workloads (no model: tokens are simulated)."""

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.block_manager import NULL_BLOCK, BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import SeqStatus, Sequence

PREFIXES = [list(range(100, 100 + n)) for n in (0, 8, 13, 24)]


def check_invariants(bm: BlockManager, sched: Scheduler) -> None:
    live = [s for s in sched.running] + [s for s in sched.waiting if s.block_table]
    owners = Counter(b for s in live for b in s.block_table)
    assert NULL_BLOCK not in owners
    for block_id, count in owners.items():
        block = bm.blocks[block_id]
        assert block.ref_count == count, f"block {block_id}: ref {block.ref_count} != {count} users"
        assert block_id not in bm.free
        if count > 1:  # shared only as a cached prefix block, and only among the sharers' full blocks
            assert block.hash is not None
    for block_id in bm.free:
        assert bm.blocks[block_id].ref_count == 0
    assert len(owners) + bm.num_free_blocks == bm.num_usable_blocks
    for seq in sched.running:
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
    # The array of block tables (a step's tables in one gather) mirrors every live table, zeros past its end.
    with_blocks = [s for s in live if s.block_table]
    assert len({s.table_row for s in with_blocks}) == len(with_blocks)
    if with_blocks:
        tables = bm.tables(with_blocks)
        assert tables.shape[1] == max(len(s.block_table) for s in with_blocks)
        for row, s in zip(tables.tolist(), with_blocks, strict=True):
            assert row == s.block_table + [NULL_BLOCK] * (len(row) - len(s.block_table))


requests = st.lists(
    st.tuples(st.integers(0, 3), st.integers(1, 40), st.integers(1, 30)), min_size=1, max_size=25
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=requests,
    num_blocks=st.integers(12, 60),
    block_size=st.sampled_from([1, 4, 8]),
    budget=st.integers(1, 64),
    max_seqs=st.integers(1, 8),
    prefix_caching=st.booleans(),
)
def test_random_workloads_keep_block_and_budget_invariants(
    reqs, num_blocks, block_size, budget, max_seqs, prefix_caching
):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    sched = Scheduler(bm, budget, max_seqs)
    seqs = []
    for i, (prefix, tail, max_new) in enumerate(reqs):
        prompt = PREFIXES[prefix] + [1000 + i * 50 + j for j in range(tail)]
        if -(-(len(prompt) + max_new) // block_size) > bm.num_usable_blocks:
            continue  # the engine rejects these at submission
        seq = Sequence(
            i, str(i), 0, prompt, SamplingParams(max_new_tokens=max_new), seed=i, stop_ids=frozenset()
        )
        sched.add(seq)
        seqs.append(seq)

    for _ in range(5000):
        if not sched.has_work():
            break
        batch = sched.schedule()
        check_invariants(bm, sched)
        assert batch.num_tokens <= budget
        assert len(batch.items) <= max_seqs
        assert len({id(it.seq) for it in batch.items}) == len(batch.items)
        assert batch.items or not sched.running, "running sequences but nothing scheduled: deadlock"
        for it in batch.items:
            assert it.seq.status is SeqStatus.RUNNING and it.seq.num_computed_tokens <= it.seq.num_tokens
            if it.sample:
                seq = it.seq
                seq.num_pending_tokens -= 1
                seq.output_token_ids.append(7000 + seq.seq_id)
                if len(seq.output_token_ids) >= seq.params.max_new_tokens:
                    seq.status = SeqStatus.FINISHED
                    sched.finish(seq)
                else:
                    bm.register_full_blocks(seq)
        check_invariants(bm, sched)
    assert all(s.status is SeqStatus.FINISHED for s in seqs), "some requests never finished"
    assert all(len(s.output_token_ids) == s.params.max_new_tokens for s in seqs)
    assert bm.num_free_blocks == bm.num_usable_blocks, "blocks leaked"
    assert all(b.ref_count == 0 for b in bm.blocks)
