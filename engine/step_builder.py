"""Build one step's inputs (``StepArrays``) from a scheduled batch.

The loop in here is over sequences, to read their tokens and parameters; everything per token
is built with array operations. A token that the previous step is still sampling (async mode)
gets a placeholder id and a carry-over index: its row in the previous step's sampled tokens.
"""

from __future__ import annotations

import numpy as np

from engine.runner.step_layout import MAX_SUPPRESS, StepArrays
from engine.scheduler import ScheduledBatch

PLACEHOLDER_TOKEN = 0


def build_step_arrays(batch: ScheduledBatch, block_size: int, prev_rows: dict[int, int]) -> StepArrays:
    """``prev_rows`` maps a sequence id to its row among the previous step's sampled tokens."""
    items = batch.items
    n = len(items)
    lens = np.fromiter((it.num_new_tokens for it in items), dtype=np.int64, count=n)
    starts = np.fromiter((it.start for it in items), dtype=np.int64, count=n)
    num_tokens = int(lens.sum())
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    query_seq = np.repeat(np.arange(n), lens)
    query_index = np.arange(num_tokens) - np.repeat(cu[:-1], lens)
    positions = np.repeat(starts, lens) + query_index

    max_blocks = max(len(it.seq.block_table) for it in items)
    tables = np.zeros((n, max_blocks), dtype=np.int64)
    ids = np.full(num_tokens, PLACEHOLDER_TOKEN, dtype=np.int64)
    carry = np.full(num_tokens, -1, dtype=np.int64)
    for i, it in enumerate(items):
        seq = it.seq
        tables[i, : len(seq.block_table)] = seq.block_table
        end = it.start + it.num_new_tokens
        known_end = min(end, seq.num_known_tokens)
        if known_end > it.start:
            ids[cu[i] : cu[i] + known_end - it.start] = seq.known_tokens(it.start, known_end)
        if known_end < end:
            # Only the last token can be unknown: the one the previous step is sampling.
            assert end - known_end == 1, "more than one token of a sequence is in flight"
            carry[cu[i + 1] - 1] = prev_rows[seq.seq_id]
    slots = tables[query_seq, positions // block_size] * block_size + positions % block_size

    rows = batch.sampled
    sampled = np.fromiter((i for i, it in enumerate(items) if it.sample), dtype=np.int64, count=len(rows))
    sample_pos = np.fromiter((it.start + it.num_new_tokens for it in rows), dtype=np.int64, count=len(rows))
    # Rows pad with their own first id (or -1 when they forbid nothing), so a scatter never races.
    suppress = np.full((len(rows), MAX_SUPPRESS), -1, dtype=np.int64)
    for r, it in enumerate(rows):
        seq = it.seq
        if sample_pos[r] - seq.prompt_len < seq.params.min_new_tokens and seq.stop_ids:
            forbid = sorted(seq.stop_ids)
            suppress[r, :] = forbid[0]
            suppress[r, : len(forbid)] = forbid
    score_indices = np.zeros(batch.num_scored, dtype=np.int64)
    score_targets = np.zeros(batch.num_scored, dtype=np.int64)
    score_top_k, pos = 0, 0
    if batch.num_scored:
        for i, it in enumerate(items):
            p = it.num_scored
            if p:
                score_indices[pos : pos + p] = np.arange(cu[i], cu[i] + p)
                score_targets[pos : pos + p] = it.seq.prompt_token_ids[it.start + 1 : it.start + 1 + p]
                score_top_k = max(score_top_k, it.seq.params.prompt_logprobs)
                pos += p
    params = [it.seq.params for it in rows]
    temperature = np.array([p.temperature for p in params], dtype=np.float32)
    sampling = temperature > 0
    top_k = np.array([p.top_k for p in params], dtype=np.int64)
    top_p = np.array([p.top_p for p in params], dtype=np.float32)
    min_p = np.array([p.min_p for p in params], dtype=np.float32)
    return StepArrays(
        input_ids=ids,
        carry=carry,
        positions=positions,
        slot_mapping=slots,
        query_seq=query_seq,
        query_index=query_index,
        block_tables=tables,
        context_lens=starts + lens,
        logits_indices=cu[1:][sampled] - 1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=np.array([it.seq.seed for it in rows], dtype=np.int64),
        sample_pos=sample_pos,
        suppress=suppress,
        max_query_len=int(lens.max()),
        max_context_len=int((starts + lens).max()),
        any_sampling=bool(sampling.any()),
        any_top_k_top_p=bool((sampling & ((top_k > 0) | (top_p < 1))).any()),
        any_min_p=bool((sampling & (min_p > 0)).any()),
        score_indices=score_indices,
        score_targets=score_targets,
        score_top_k=score_top_k,
        any_top_logprobs=any(p.top_logprobs > 0 for p in params),
    )
