"""Build one step's inputs (``StepArrays``) from a scheduled batch.

The loop in here is over sequences, to read their tokens and parameters; everything per token
is built with array operations. A token that the previous step is still sampling (async mode)
gets a placeholder id and a carry-over index: its row in the previous step's sampled tokens.

Most steps are decode steps (one token per sequence), so the per-sequence loop does as little
as it can for a one-token item, and the block tables come from the block manager's array of
tables in one gather (``ScheduledBatch.block_tables``).
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
    starts_list = [it.start for it in items]
    starts = np.array(starts_list, dtype=np.int64)
    num_tokens = batch.num_tokens
    if num_tokens == n:  # one token per sequence (decode steps): no per-token expansion
        lens = np.ones(n, dtype=np.int64)
        cu = np.arange(n + 1, dtype=np.int64)
        query_seq = cu[:-1]
        query_index = np.zeros(n, dtype=np.int64)
        positions = starts
    else:
        lens = np.array([it.num_new_tokens for it in items], dtype=np.int64)
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        query_seq = np.repeat(np.arange(n), lens)
        query_index = np.arange(num_tokens) - np.repeat(cu[:-1], lens)
        positions = np.repeat(starts, lens) + query_index
    tables = batch.block_tables

    ids = np.full(num_tokens, PLACEHOLDER_TOKEN, dtype=np.int64)
    carry = np.full(num_tokens, -1, dtype=np.int64)
    id_at: list[int] = []  # single known tokens: their index in the step, and their id
    id_val: list[int] = []
    carry_at: list[int] = []  # tokens the previous step is sampling: their index, and its row
    carry_row: list[int] = []
    pos = 0
    for it, start in zip(items, starts_list, strict=True):
        seq = it.seq
        m = it.num_new_tokens
        p = seq.prompt_len
        known = p + len(seq.output_token_ids)
        if m == 1:
            if start < known:
                id_at.append(pos)
                id_val.append(seq.output_token_ids[start - p] if start >= p else seq.prompt_token_ids[start])
            else:
                carry_at.append(pos)
                carry_row.append(prev_rows[seq.seq_id])
            pos += 1
            continue
        end = start + m
        known_end = min(end, known)
        if known_end > start:
            ids[pos : pos + known_end - start] = seq.known_tokens(start, known_end)
        if known_end < end:
            # Only the last token can be unknown: the one the previous step is sampling.
            assert end - known_end == 1, "more than one token of a sequence is in flight"
            carry[pos + m - 1] = prev_rows[seq.seq_id]
        pos += m
    if id_at:
        ids[id_at] = id_val
    if carry_at:
        carry[carry_at] = carry_row
    slots = tables[query_seq, positions // block_size] * block_size + positions % block_size

    rows = batch.sampled
    num_rows = len(rows)
    if num_rows == n:
        logits_indices = cu[1:] - 1
        sample_pos = starts + lens
    else:
        sampled = np.array([i for i, it in enumerate(items) if it.sample], dtype=np.int64)
        logits_indices = cu[1:][sampled] - 1
        sample_pos = (starts + lens)[sampled]
    seqs = [it.seq for it in rows]
    params = [seq.params for seq in seqs]
    # Rows pad with their own first id (or -1 when they forbid nothing), so a scatter never races.
    suppress = np.full((num_rows, MAX_SUPPRESS), -1, dtype=np.int64)
    min_new = np.array([p.min_new_tokens for p in params], dtype=np.int64)
    if min_new.any():
        prompt_lens = np.array([seq.prompt_len for seq in seqs], dtype=np.int64)
        for r in np.flatnonzero(sample_pos - prompt_lens < min_new).tolist():
            stop_ids = seqs[r].stop_ids
            if stop_ids:
                forbid = sorted(stop_ids)
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
    temperature = np.array([p.temperature for p in params], dtype=np.float32)
    sampling = temperature > 0
    top_k = np.array([p.top_k for p in params], dtype=np.int64)
    top_p = np.array([p.top_p for p in params], dtype=np.float32)
    min_p = np.array([p.min_p for p in params], dtype=np.float32)
    context_lens = starts + lens
    return StepArrays(
        input_ids=ids,
        carry=carry,
        positions=positions,
        slot_mapping=slots,
        query_seq=query_seq,
        query_index=query_index,
        block_tables=tables,
        context_lens=context_lens,
        logits_indices=logits_indices,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=np.array([seq.seed for seq in seqs], dtype=np.int64),
        sample_pos=sample_pos,
        suppress=suppress,
        max_query_len=1 if num_tokens == n else int(lens.max()),
        max_context_len=int(context_lens.max()),
        any_sampling=bool(sampling.any()),
        any_top_k_top_p=bool((sampling & ((top_k > 0) | (top_p < 1))).any()),
        any_min_p=bool((sampling & (min_p > 0)).any()),
        score_indices=score_indices,
        score_targets=score_targets,
        score_top_k=score_top_k,
        any_top_logprobs=any(p.top_logprobs > 0 for p in params),
    )
