"""Fused sampling on CUDA (Triton): the semantics of ``sampler.sample`` without sorting the vocabulary.

Each row's vocabulary is cut into chunks of ``CHUNK`` tokens, and the passes every row needs run
one program per (row, chunk) (``sampler_split``), so that a step's few hundred rows fill the GPU; a
short final launch, one program per row, combines them. The chunk count depends on the vocabulary
only, so a row's result never depends on the batch around it.

Pass 1 finds the row's raw log-sum-exp and finiteness, the greedy argmax (after suppression and
token masks) and the candidate: the argmax of ``logits / T + gumbel`` over the whole vocabulary,
with the noise hashed in-kernel exactly as ``uniform_noise`` does. The filters keep a prefix of the
tokens in descending order of scaled logit (ties by index, as the reference's sort leaves them),
and the Gumbel-max draw over a prefix is the global candidate whenever the candidate lies in it.
A top-k row first finds its boundary by a radix select (four passes, one byte of the values'
order-preserving integer keys each, over the chunks' 256-bin histograms) and draws its candidate
over its top-k set. A top-p or min-p filter is then settled by a check pass (the candidate's rank
and the mass before it); a rejected candidate is followed by rounds: the kept prefix lies wholly
before it, so the draw over the tokens before it is the next candidate, one pass per round that
checks a candidate and draws the next (a share of about 1 - top_p of the rows needs them, mostly
one or two). The check and the first ``SPLIT_ROUNDS`` rounds run split over chunks; a row still
unsettled continues alone in the final launch, and after ``ROUNDS`` rounds finds the top-p
boundary by a search over the keys, picks the boundary among tied tokens and draws over the
prefix. A top-k row whose boundary cuts through tied tokens takes that sequential path from the
start. The launches have fixed shapes and no host syncs, so they can be captured in a CUDA graph.

Known differences from the reference, all at float-rounding boundaries: probability masses are
summed in another order (a token whose mass before it equals top_p to the last bit may go either
way), min-p compares ``exp(s - max) >= min_p`` rather than the ratio of two rounded softmax values,
and the reference's cumulative sum can round to 1.0 and drop the last, vanishing tail tokens of a
row with top_p == 1 that the kernel keeps.
"""

from __future__ import annotations

import torch

from engine.runner.sampler import INVALID_TOKEN, SamplingTensors, TokenMask
from engine.runner.sampler_split import (
    check_round_kernel,
    combine_pass1,
    combine_round,
    pass1_kernel,
    radix_kernel,
    row_context,
    row_filters,
    topk_candidate,
    topk_draw_kernel,
)
from engine.runner.sampler_triton import (
    accepts,
    check_range,
    gumbel,
    key_of,
    kth_key,
    load_tile,
    pass1_range,
    round_range,
    search,
    triton,
    unkey,
)

if triton is not None:
    import triton.language as tl

TILE = 2048
CHUNK = 8 * TILE
"""Tokens per program in the split passes: 8 chunks of a 128k vocabulary, 10 of a 152k one."""
SPLIT_ROUNDS = 3
"""Rounds run split over chunks before an unsettled row continues alone."""


def fused_sampler_available(device: torch.device) -> bool:
    """Whether ``sample_fused`` can run on ``device``."""
    return triton is not None and device.type == "cuda"


if triton is not None:
    _INVALID = tl.constexpr(INVALID_TOKEN)

    @triton.jit(do_not_specialize=["rows", "S"])
    def _final_kernel(
        X,
        stride_x,
        Sup,
        stride_sup,
        Mrow,
        M,
        stride_m,
        Temp,
        TopK,
        TopP,
        MinP,
        Seed,
        Pos,
        PF,
        PI,
        HS,
        TF,
        TI,
        RF,
        RI,
        SF,
        SI,
        Tokens,
        Logprobs,
        V,
        rows,
        S,
        SP: tl.constexpr,
        K_SUP: tl.constexpr,
        HAS_SUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
        SAMPLING: tl.constexpr,
        TOPKP: tl.constexpr,
        MINP: tl.constexpr,
        WANT_LP: tl.constexpr,
        SPLIT_R: tl.constexpr,
        TILE: tl.constexpr,
        TILE_S: tl.constexpr,
        NB: tl.constexpr,
        ROUNDS: tl.constexpr,
    ):
        row = tl.program_id(0)
        row_ptr, sup, mptr, mon, sampling, Td, rkey = row_context(
            X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, Seed, Pos, row, K_SUP, HAS_SUP, HAS_MASK
        )
        m_raw, z_raw, bad, g_val, g_idx, c_idx = combine_pass1(PF, PI, row, S, SP)
        finite = bad == 0
        tok = g_idx

        if SAMPLING:  # noqa: SIM102 (a compile-time and a run-time condition)
            if sampling & finite:
                tok = c_idx
                if TOPKP or MINP:
                    use_k, use_p, k_eff, top_p, min_p = row_filters(TopK, TopP, MinP, row, V, TOPKP, MINP)
                    m_s = tl.math.div_rn(g_val, Td)
                    KEY_LOW = key_of(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
                    # The kept prefix: tokens with key above kB, and the first nB tokens with key kB.
                    kB = KEY_LOW
                    nB = V
                    Z = tl.zeros((), tl.float32)
                    accept = tl.full((), 1, tl.int1)
                    cand = c_idx
                    tied = tl.full((), 0, tl.int1)  # a top-k boundary through tied tokens: all here, alone
                    if TOPKP:  # noqa: SIM102
                        if use_k:
                            split, kB, nB, c_k, Z = topk_candidate(HS, TF, TI, rows, row, S, SP, k_eff, m_s)
                            cand = c_k
                            tied = ~split
                    if (use_p | (min_p > 0.0)) & ~tied:  # settled, or begun, by the split launches
                        last = SPLIT_R % 2
                        if SPLIT_R == 0:
                            before_n, before_m, Z, _ = combine_round(RF, RI, last, rows, row, S, SP)
                            e_c = tl.exp(tl.math.div_rn(tl.load(row_ptr + cand).to(tl.float32), Td) - m_s)
                            accept = accepts(before_n, before_m, Z, e_c, k_eff, use_p, top_p, min_p, MINP)
                        else:
                            cand = tl.load(SI + (last * rows + row) * 2)
                            accept = tl.load(SI + (last * rows + row) * 2 + 1) != 0
                            Z = tl.load(SF + last * rows + row)
                            if accept == 0:
                                before_n, before_m, _, n_idx = combine_round(RF, RI, last, rows, row, S, SP)
                                s_cand = tl.math.div_rn(tl.load(row_ptr + cand).to(tl.float32), Td)
                                accept = accepts(
                                    before_n,
                                    before_m,
                                    Z,
                                    tl.exp(s_cand - m_s),
                                    k_eff,
                                    use_p,
                                    top_p,
                                    min_p,
                                    MINP,
                                )
                                cand = tl.where(accept, cand, n_idx)
                    if tied:
                        # The candidate over the whole vocabulary (pass 1 skipped it for top-k rows), the
                        # boundary and the check, in this program.
                        _, _, _, _, _, _, cand = pass1_range(
                            row_ptr,
                            0,
                            V,
                            V,
                            sup,
                            mptr,
                            mon,
                            rkey,
                            Td,
                            sampling,
                            True,
                            False,
                            TILE,
                            HAS_SUP,
                            HAS_MASK,
                        )
                        kB, above_k = kth_key(
                            row_ptr, V, sup, mptr, mon, Td, k_eff, TILE_S, HAS_SUP, HAS_MASK
                        )
                        nB = k_eff - above_k
                        s_c = tl.math.div_rn(tl.load(row_ptr + cand).to(tl.float32), Td)
                        before_n, before_m, z_all, mass_k = check_range(
                            row_ptr,
                            0,
                            V,
                            V,
                            sup,
                            mptr,
                            mon,
                            Td,
                            m_s,
                            key_of(s_c),
                            cand,
                            kB,
                            TILE,
                            HAS_SUP,
                            HAS_MASK,
                        )
                        # The top-k set's mass: the tokens above kB and nB of those at kB.
                        Z = mass_k + nB.to(tl.float32) * tl.exp(unkey(kB.to(tl.int32)) - m_s)
                        accept = accepts(
                            before_n, before_m, Z, tl.exp(s_c - m_s), k_eff, use_p, top_p, min_p, MINP
                        )
                    if accept == 0 and tied == 0:
                        # Rounds: the kept set is a prefix of the order, so it lies wholly before a
                        # rejected candidate; the draw over what lies before it is the next candidate.
                        rounds = tl.zeros((), tl.int32)
                        while (accept == 0) & (rounds < ROUNDS):
                            s_cand = tl.math.div_rn(tl.load(row_ptr + cand).to(tl.float32), Td)
                            before_n, before_m, n_val, n_idx = round_range(
                                row_ptr, 0, V, V, sup, mptr, mon, rkey, Td, m_s, key_of(s_cand), cand,
                                TILE, HAS_SUP, HAS_MASK,
                            )  # fmt: skip
                            accept = accepts(
                                before_n, before_m, Z, tl.exp(s_cand - m_s), k_eff, use_p, top_p, min_p, MINP
                            )
                            cand = tl.where(accept, cand, n_idx)
                            rounds += 1
                    tok = cand
                    if accept == 0:  # top-k with top-p, or a row the rounds did not settle: search
                        if use_p:
                            lo = tl.where(use_k, kB, KEY_LOW)
                            hi = key_of(m_s).to(tl.int64)
                            kp, above_p, mass_p = search(
                                row_ptr,
                                V,
                                sup,
                                mptr,
                                mon,
                                Td,
                                m_s,
                                lo,
                                hi,
                                top_p,
                                Z,
                                TILE_S,
                                NB,
                                HAS_SUP,
                                HAS_MASK,
                            )
                            e_p = tl.exp(unkey(kp.to(tl.int32)) - m_s)
                            # Ties at kp: the j-th (from 0) stays while its mass before stays below top_p.
                            n_p = tl.math.ceil(tl.minimum((top_p * Z - mass_p) / e_p, V.to(tl.float32)))
                            n_p = tl.maximum(n_p.to(tl.int32), 1)
                            n_p = tl.where(use_k & (kp == kB), tl.minimum(n_p, nB), n_p)
                            kB = kp
                            nB = n_p
                        # Index of the nB-th tied token at key kB (the last one the prefix keeps).
                        iB = V
                        if nB < V:
                            run = tl.zeros((), tl.int32)
                            for start in range(0, V, TILE):
                                idx, valid, x, xs = load_tile(
                                    row_ptr, start, V, sup, mptr, mon, TILE, HAS_SUP, HAS_MASK
                                )
                                key = key_of(tl.math.div_rn(xs, Td))
                                tie = valid & (key == kB)
                                rank = tl.cumsum(tie.to(tl.int32), axis=0) + run
                                iB = tl.minimum(iB, tl.min(tl.where(tie & (rank == nB), idx, V), axis=0))
                                run += tl.sum(tie.to(tl.int32), axis=0)
                        # Draw over the kept prefix.
                        c_val = tl.full((), float("-inf"), tl.float32)
                        d_idx = tl.zeros((), tl.int32)
                        for start in range(0, V, TILE):
                            idx, valid, x, xs = load_tile(
                                row_ptr, start, V, sup, mptr, mon, TILE, HAS_SUP, HAS_MASK
                            )
                            s = tl.math.div_rn(xs, Td)
                            key = key_of(s)
                            keep = valid & ((key > kB) | ((key == kB) & (idx <= iB)))
                            if MINP:
                                keep = keep & (tl.exp(s - m_s) >= min_p)
                            v = tl.where(keep, s + gumbel(rkey, idx), float("-inf"))
                            t_val, t_idx = tl.max(
                                v, axis=0, return_indices=True, return_indices_tie_break_left=True
                            )
                            if t_val > c_val:
                                c_val = t_val
                                d_idx = start + t_idx
                        tok = d_idx
        if WANT_LP:  # noqa: SIM108
            lp = tl.load(row_ptr + tok).to(tl.float32) - (m_raw + tl.log(z_raw))
        else:
            lp = 0.0
        tl.store(Tokens + row, tl.where(finite, tok.to(tl.int64), _INVALID))
        tl.store(Logprobs + row, lp)


def sample_fused(
    logits: torch.Tensor, st: SamplingTensors, want_logprobs: bool, mask: TokenMask | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sampler.sample`` in a few Triton launches: the same tokens for the same seeds (CUDA only).

    With ``mask``, its rows choose among the tokens it allows, as in ``sampler.sample``."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    dev = logits.device
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    logprobs = torch.empty(rows, dtype=torch.float32, device=dev)
    if rows == 0:
        return tokens, logprobs
    sup = st.suppress
    k_sup = sup.shape[1]
    if k_sup & (k_sup - 1):  # pad to a power of two with ids that match no token
        sup = torch.cat([sup, sup.new_full((rows, triton.next_power_of_2(k_sup) - k_sup), -1)], dim=1)
    if k_sup == 0:
        sup = tokens[:, None]  # unread
    if mask is not None:
        words = mask.words.to(device=dev, dtype=torch.int32).contiguous()
        mrow = torch.full((rows,), -1, dtype=torch.int32, device=dev)
        mrow[mask.rows] = torch.arange(len(mask.rows), dtype=torch.int32, device=dev)
    else:
        words, mrow = logprobs, logprobs  # unread
    chunks = triton.cdiv(vocab, CHUNK)
    sp = triton.next_power_of_2(chunks)
    filters = st.any_sampling and (st.any_top_k_top_p or st.any_min_p)
    top_k = st.any_sampling and st.any_top_k_top_p
    split_rounds = SPLIT_ROUNDS if filters else 0

    def scratch(*shape: int, dtype: torch.dtype = torch.int32, needed: bool = True) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=dev) if needed else tokens  # unread when not needed

    pf, pi = scratch(rows, sp, 4, dtype=torch.float32), scratch(rows, sp, 4)
    hs = scratch(4, rows, sp, 256, needed=top_k)
    tf, ti = scratch(rows, sp, 2, dtype=torch.float32, needed=top_k), scratch(rows, sp, needed=top_k)
    rf, ri = (
        scratch(2, rows, sp, 2, dtype=torch.float32, needed=filters),
        scratch(2, rows, sp, 2, needed=filters),
    )
    sf, si = scratch(2, rows, dtype=torch.float32, needed=filters), scratch(2, rows, 2, needed=filters)
    args = (logits, logits.stride(0), sup, sup.stride(0), mrow, words, words.stride(0))
    args += (st.temperature, st.top_k, st.top_p, st.min_p, st.seed, st.position, pf, pi)
    flags = dict(SP=sp, K_SUP=max(sup.shape[1], 1), HAS_SUP=k_sup > 0, HAS_MASK=mask is not None, num_warps=8)
    split = dict(CH=CHUNK, TILE=TILE, **flags)
    grid = (rows, chunks)
    pass1_kernel[grid](*args, vocab, SAMPLING=st.any_sampling, TOPKP=top_k, WANT_LP=want_logprobs, **split)
    if top_k:
        for j in range(4):
            radix_kernel[grid](*args, hs, vocab, rows, chunks, j, **split)
        topk_draw_kernel[grid](*args, hs, tf, ti, vocab, rows, chunks, **split)
    if filters:
        for r in range(split_rounds + 1):
            check_round_kernel[grid](
                *args, hs, tf, ti, rf, ri, sf, si, vocab, rows, chunks, r,
                TOPKP=st.any_top_k_top_p, MINP=st.any_min_p, **split,
            )  # fmt: skip
    _final_kernel[(rows,)](
        *args, hs, tf, ti, rf, ri, sf, si, tokens, logprobs, vocab, rows, chunks,
        SAMPLING=st.any_sampling, TOPKP=st.any_top_k_top_p, MINP=st.any_min_p, WANT_LP=want_logprobs,
        SPLIT_R=split_rounds, TILE=TILE, TILE_S=512, NB=16, ROUNDS=32, **flags,
    )  # fmt: skip
    return tokens, logprobs
