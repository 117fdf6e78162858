"""Fused sampling on CUDA (Triton): the semantics of ``sampler.sample`` without sorting the vocabulary.

Each row's vocabulary is cut into chunks of ``CHUNK`` tokens, and the passes every row needs run
one program per (row, chunk), so that a step's few hundred rows fill the GPU; a short final launch
(one program per row) combines them. The chunk count depends on the vocabulary only, so a row's
result never depends on the batch around it.

Pass 1 finds the row's raw log-sum-exp and finiteness, the greedy argmax (after suppression and
token masks) and the candidate: the argmax of ``logits / T + gumbel`` over the whole vocabulary,
with the noise hashed in-kernel exactly as ``uniform_noise`` does. The filters (top-k, top-p,
min-p) keep a prefix of the tokens in descending order of scaled logit (ties by index, as the
reference's sort leaves them), and the Gumbel-max draw over a prefix is the global candidate
whenever the candidate lies in it: a check pass decides that. When the candidate of a top-p or
min-p row (without top-k) is rejected, rounds follow: the kept prefix lies wholly before the
rejected candidate, so the draw over the tokens before it is the next candidate, one pass per
round that checks a candidate and draws the next (a share of about 1 - top_p of the rows needs
them, mostly one or two). The check pass and the first ``SPLIT_ROUNDS`` rounds run split over
chunks; a row still unsettled continues in the final launch, alone.

Rows with a top-k limit run in the final launch: a radix select of the boundary (four passes, one
byte of the values' order-preserving integer keys each, a 256-bin histogram), a check pass, and
on rejection a draw over the kept prefix. The top-p boundary under a top-k limit, or after
``ROUNDS`` rounds, is found by a search over the keys, then one pass picks the boundary among tied
tokens and one pass draws over the prefix. The launches have fixed shapes and no host syncs, so
they can be captured in a CUDA graph.

Known differences from the reference, all at float-rounding boundaries: probability masses are
summed in another order (a token whose mass before it equals top_p to the last bit may go either
way), min-p compares ``exp(s - max) >= min_p`` rather than the ratio of two rounded softmax values,
and the reference's cumulative sum can round to 1.0 and drop the last, vanishing tail tokens of a
row with top_p == 1 that the kernel keeps.
"""

from __future__ import annotations

import torch

from engine.runner.sampler import INVALID_TOKEN, SamplingTensors, TokenMask
from engine.runner.sampler_triton import (
    accepts,
    check_range,
    gumbel,
    key_of,
    kth_key,
    load_tile,
    pass1_range,
    round_range,
    row_key,
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

    @triton.jit
    def _row(
        X,
        stride_x,
        Sup,
        stride_sup,
        Mrow,
        M,
        stride_m,
        Temp,
        Seed,
        Pos,
        row,
        K_SUP: tl.constexpr,
        HAS_SUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        """A row's logits, suppressed ids, mask words, temperature and noise key."""
        row_ptr = X + row.to(tl.int64) * stride_x
        if HAS_SUP:
            sup = tl.load(Sup + row.to(tl.int64) * stride_sup + tl.arange(0, K_SUP)).to(tl.int32)
        else:
            sup = tl.zeros((K_SUP,), tl.int32)
        mptr = M
        mon = tl.full((), 0, tl.int1)
        if HAS_MASK:
            mi = tl.load(Mrow + row)
            mon = mi >= 0
            mptr = M + tl.maximum(mi, 0).to(tl.int64) * stride_m
        T = tl.load(Temp + row)
        sampling = T > 0.0
        Td = tl.where(sampling, T, 1.0)
        rkey = row_key(tl.load(Seed + row), tl.load(Pos + row))
        return row_ptr, sup, mptr, mon, sampling, Td, rkey

    @triton.jit
    def _filters(TopK, TopP, MinP, row, V, TOPKP: tl.constexpr, MINP: tl.constexpr):
        """A row's filter settings: top-k on, top-p on, the top-k limit (V when off), top_p, min_p."""
        use_k = tl.full((), 0, tl.int1)
        use_p = tl.full((), 0, tl.int1)
        k_eff = tl.full((), 0, tl.int32) + V
        top_p = tl.full((), 1.0, tl.float32)
        min_p = tl.zeros((), tl.float32)
        if TOPKP:
            top_k = tl.load(TopK + row)
            top_p = tl.load(TopP + row)
            use_k = (top_k > 0) & (top_k < V)
            use_p = top_p < 1.0
            k_eff = tl.where(use_k, top_k, V).to(tl.int32)
        if MINP:
            min_p = tl.load(MinP + row)
        return use_k, use_p, k_eff, top_p, min_p

    @triton.jit
    def _combine_pass1(PF, PI, row, S, SP: tl.constexpr):
        """Pass 1's partials of a row's chunks, combined in chunk order (ties to the lower index)."""
        c = tl.arange(0, SP)
        ok = c < S
        base = (row.to(tl.int64) * SP + c) * 4
        m = tl.load(PF + base, mask=ok, other=-3.0e38)
        z = tl.load(PF + base + 1, mask=ok, other=0.0)
        gv = tl.load(PF + base + 2, mask=ok, other=float("-inf"))
        cv = tl.load(PF + base + 3, mask=ok, other=float("-inf"))
        bad = tl.sum(tl.load(PI + base, mask=ok, other=0), axis=0)
        m_raw = tl.max(m, axis=0)
        z_raw = tl.sum(z * tl.exp(m - m_raw), axis=0)
        g_val, j = tl.max(gv, axis=0, return_indices=True, return_indices_tie_break_left=True)
        g_idx = tl.sum(tl.where(c == j, tl.load(PI + base + 1, mask=ok, other=0), 0), axis=0)
        c_val, j = tl.max(cv, axis=0, return_indices=True, return_indices_tie_break_left=True)
        c_idx = tl.sum(tl.where(c == j, tl.load(PI + base + 2, mask=ok, other=0), 0), axis=0)
        return m_raw, z_raw, bad, g_val, g_idx, c_idx

    @triton.jit
    def _combine_round(RF, RI, buf, rows, row, S, SP: tl.constexpr):
        """A split check or round's partials of a row: count and mass before, and the third field
        (the total mass after a check, the next candidate's index after a round)."""
        c = tl.arange(0, SP)
        ok = c < S
        base = ((buf * rows + row).to(tl.int64) * SP + c) * 2
        before_n = tl.sum(tl.load(RI + base, mask=ok, other=0), axis=0)
        before_m = tl.sum(tl.load(RF + base, mask=ok, other=0.0), axis=0)
        third = tl.load(RF + base + 1, mask=ok, other=float("-inf"))
        z_all = tl.sum(tl.where(ok, third, 0.0), axis=0)
        _, j = tl.max(third, axis=0, return_indices=True, return_indices_tie_break_left=True)
        n_idx = tl.sum(tl.where(c == j, tl.load(RI + base + 1, mask=ok, other=0), 0), axis=0)
        return before_n, before_m, z_all, n_idx

    @triton.jit
    def _pass1_kernel(
        X,
        stride_x,
        Sup,
        stride_sup,
        Mrow,
        M,
        stride_m,
        Temp,
        Seed,
        Pos,
        PF,
        PI,
        V,
        SP: tl.constexpr,
        K_SUP: tl.constexpr,
        HAS_SUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
        SAMPLING: tl.constexpr,
        WANT_LP: tl.constexpr,
        CH: tl.constexpr,
        TILE: tl.constexpr,
    ):
        row = tl.program_id(0)
        c = tl.program_id(1)
        row_ptr, sup, mptr, mon, sampling, Td, rkey = _row(
            X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, Seed, Pos, row, K_SUP, HAS_SUP, HAS_MASK
        )
        lo = c * CH
        m_raw, z_raw, bad, g_val, g_idx, c_val, c_idx = pass1_range(
            row_ptr,
            lo,
            tl.minimum(lo + CH, V),
            V,
            sup,
            mptr,
            mon,
            rkey,
            Td,
            sampling,
            SAMPLING,
            WANT_LP,
            TILE,
            HAS_SUP,
            HAS_MASK,
        )
        base = (row.to(tl.int64) * SP + c) * 4
        tl.store(PF + base, m_raw)
        tl.store(PF + base + 1, z_raw)
        tl.store(PF + base + 2, g_val)
        tl.store(PF + base + 3, c_val)
        tl.store(PI + base, bad)
        tl.store(PI + base + 1, g_idx)
        tl.store(PI + base + 2, c_idx)

    # Launch sizes vary by step: not specialising on them keeps one compiled kernel for every step size.
    @triton.jit(do_not_specialize=["rows", "S", "r"])
    def _split_kernel(
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
        RF,
        RI,
        SF,
        SI,
        V,
        rows,
        S,
        r,
        SP: tl.constexpr,
        K_SUP: tl.constexpr,
        HAS_SUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
        TOPKP: tl.constexpr,
        MINP: tl.constexpr,
        CH: tl.constexpr,
        TILE: tl.constexpr,
    ):
        """``r`` = 0: the check pass of each row's candidate; ``r`` >= 1: round ``r``. Rows with a
        top-k limit, without a top-p / min-p filter, or not sampling are left to the final launch."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        row_ptr, sup, mptr, mon, sampling, Td, rkey = _row(
            X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, Seed, Pos, row, K_SUP, HAS_SUP, HAS_MASK
        )
        use_k, use_p, k_eff, top_p, min_p = _filters(TopK, TopP, MinP, row, V, TOPKP, MINP)
        m_raw, z_raw, bad, g_val, g_idx, c_idx = _combine_pass1(PF, PI, row, S, SP)
        if sampling & (bad == 0) & ~use_k & (use_p | (min_p > 0.0)):
            m_s = tl.math.div_rn(g_val, Td)
            lo = c * CH
            hi = tl.minimum(lo + CH, V)
            cur = r % 2
            if r == 0:
                kc = key_of(tl.math.div_rn(tl.load(row_ptr + c_idx).to(tl.float32), Td))
                KEY_LOW = key_of(tl.full((), float("-inf"), tl.float32))
                before_n, before_m, z_all, _ = check_range(
                    row_ptr, lo, hi, V, sup, mptr, mon, Td, m_s, kc, c_idx, KEY_LOW, TILE, HAS_SUP, HAS_MASK
                )
                base = ((cur * rows + row).to(tl.int64) * SP + c) * 2
                tl.store(RI + base, before_n)
                tl.store(RF + base, before_m)
                tl.store(RF + base + 1, z_all)
            else:
                prev = 1 - cur
                if r == 1:  # settle the check pass
                    before_n, before_m, Z, _ = _combine_round(RF, RI, prev, rows, row, S, SP)
                    e_c = tl.exp(tl.math.div_rn(tl.load(row_ptr + c_idx).to(tl.float32), Td) - m_s)
                    done = accepts(before_n, before_m, Z, e_c, k_eff, use_p, top_p, min_p, MINP)
                    cand = c_idx
                else:  # settle round r - 1
                    cand = tl.load(SI + (prev * rows + row) * 2)
                    done = tl.load(SI + (prev * rows + row) * 2 + 1) != 0
                    Z = tl.load(SF + prev * rows + row)
                    if done == 0:
                        before_n, before_m, _, n_idx = _combine_round(RF, RI, prev, rows, row, S, SP)
                        e_c = tl.exp(tl.math.div_rn(tl.load(row_ptr + cand).to(tl.float32), Td) - m_s)
                        done = accepts(before_n, before_m, Z, e_c, k_eff, use_p, top_p, min_p, MINP)
                        cand = tl.where(done, cand, n_idx)
                if c == 0:
                    tl.store(SI + (cur * rows + row) * 2, cand)
                    tl.store(SI + (cur * rows + row) * 2 + 1, done.to(tl.int32))
                    tl.store(SF + cur * rows + row, Z)
                if done == 0:
                    k_cand = key_of(tl.math.div_rn(tl.load(row_ptr + cand).to(tl.float32), Td))
                    before_n, before_m, n_val, n_idx = round_range(
                        row_ptr,
                        lo,
                        hi,
                        V,
                        sup,
                        mptr,
                        mon,
                        rkey,
                        Td,
                        m_s,
                        k_cand,
                        cand,
                        TILE,
                        HAS_SUP,
                        HAS_MASK,
                    )
                    base = ((cur * rows + row).to(tl.int64) * SP + c) * 2
                    tl.store(RI + base, before_n)
                    tl.store(RI + base + 1, n_idx)
                    tl.store(RF + base, before_m)
                    tl.store(RF + base + 1, n_val)

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
        row_ptr, sup, mptr, mon, sampling, Td, rkey = _row(
            X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, Seed, Pos, row, K_SUP, HAS_SUP, HAS_MASK
        )
        m_raw, z_raw, bad, g_val, g_idx, c_idx = _combine_pass1(PF, PI, row, S, SP)
        finite = bad == 0
        tok = g_idx

        if SAMPLING:  # noqa: SIM102 (a compile-time and a run-time condition)
            if sampling & finite:
                tok = c_idx
                if TOPKP or MINP:
                    use_k, use_p, k_eff, top_p, min_p = _filters(TopK, TopP, MinP, row, V, TOPKP, MINP)
                    m_s = tl.math.div_rn(g_val, Td)
                    e_c = tl.exp(tl.math.div_rn(tl.load(row_ptr + c_idx).to(tl.float32), Td) - m_s)
                    KEY_LOW = key_of(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
                    # The kept prefix: tokens with key above kB, and the first nB tokens with key kB.
                    kB = KEY_LOW
                    nB = V
                    Z = tl.zeros((), tl.float32)
                    accept = tl.full((), 1, tl.int1)
                    cand = c_idx
                    if ~use_k & (use_p | (min_p > 0.0)):  # settled, or begun, by the split launches
                        last = SPLIT_R % 2
                        if SPLIT_R == 0:
                            before_n, before_m, Z, _ = _combine_round(RF, RI, last, rows, row, S, SP)
                            accept = accepts(before_n, before_m, Z, e_c, k_eff, use_p, top_p, min_p, MINP)
                        else:
                            cand = tl.load(SI + (last * rows + row) * 2)
                            accept = tl.load(SI + (last * rows + row) * 2 + 1) != 0
                            Z = tl.load(SF + last * rows + row)
                            if accept == 0:
                                before_n, before_m, _, n_idx = _combine_round(RF, RI, last, rows, row, S, SP)
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
                    if use_k:
                        kB, above_k = kth_key(
                            row_ptr, V, sup, mptr, mon, Td, k_eff, TILE_S, HAS_SUP, HAS_MASK
                        )
                        nB = k_eff - above_k
                        kc = key_of(tl.math.div_rn(tl.load(row_ptr + c_idx).to(tl.float32), Td))
                        before_n, before_m, z_all, mass_k = check_range(
                            row_ptr, 0, V, V, sup, mptr, mon, Td, m_s, kc, c_idx, kB, TILE, HAS_SUP, HAS_MASK
                        )
                        # The top-k set's mass: the tokens above kB and nB of those at kB.
                        Z = mass_k + nB.to(tl.float32) * tl.exp(unkey(kB.to(tl.int32)) - m_s)
                        accept = accepts(before_n, before_m, Z, e_c, k_eff, use_p, top_p, min_p, MINP)
                    if accept == 0 and use_k == 0:
                        # Rounds: the kept set is a prefix of the order, so it lies wholly before a
                        # rejected candidate; the draw over what lies before it is the next candidate.
                        rounds = tl.zeros((), tl.int32)
                        while (accept == 0) & (rounds < ROUNDS):
                            s_cand = tl.math.div_rn(tl.load(row_ptr + cand).to(tl.float32), Td)
                            before_n, before_m, n_val, n_idx = round_range(
                                row_ptr,
                                0,
                                V,
                                V,
                                sup,
                                mptr,
                                mon,
                                rkey,
                                Td,
                                m_s,
                                key_of(s_cand),
                                cand,
                                TILE,
                                HAS_SUP,
                                HAS_MASK,
                            )
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
    split_rounds = SPLIT_ROUNDS if filters else 0
    pf = torch.empty(rows, sp, 4, dtype=torch.float32, device=dev)
    pi = torch.empty(rows, sp, 4, dtype=torch.int32, device=dev)
    rf = torch.empty(2, rows, sp, 2, dtype=torch.float32, device=dev) if filters else pf
    ri = torch.empty(2, rows, sp, 2, dtype=torch.int32, device=dev) if filters else pi
    sf = torch.empty(2, rows, dtype=torch.float32, device=dev) if filters else pf
    si = torch.empty(2, rows, 2, dtype=torch.int32, device=dev) if filters else pi
    row_args = (logits, logits.stride(0), sup, sup.stride(0), mrow, words, words.stride(0))
    flags = dict(K_SUP=max(sup.shape[1], 1), HAS_SUP=k_sup > 0, HAS_MASK=mask is not None)
    _pass1_kernel[(rows, chunks)](
        *row_args,
        st.temperature,
        st.seed,
        st.position,
        pf,
        pi,
        vocab,
        SP=sp,
        **flags,
        SAMPLING=st.any_sampling,
        WANT_LP=want_logprobs,
        CH=CHUNK,
        TILE=TILE,
        num_warps=8,
    )
    params = (st.temperature, st.top_k, st.top_p, st.min_p, st.seed, st.position)
    if filters:
        for r in range(split_rounds + 1):
            _split_kernel[(rows, chunks)](
                *row_args,
                *params,
                pf,
                pi,
                rf,
                ri,
                sf,
                si,
                vocab,
                rows,
                chunks,
                r,
                SP=sp,
                **flags,
                TOPKP=st.any_top_k_top_p,
                MINP=st.any_min_p,
                CH=CHUNK,
                TILE=TILE,
                num_warps=8,
            )
    _final_kernel[(rows,)](
        *row_args,
        *params,
        pf,
        pi,
        rf,
        ri,
        sf,
        si,
        tokens,
        logprobs,
        vocab,
        rows,
        chunks,
        SP=sp,
        **flags,
        SAMPLING=st.any_sampling,
        TOPKP=st.any_top_k_top_p,
        MINP=st.any_min_p,
        WANT_LP=want_logprobs,
        SPLIT_R=split_rounds,
        TILE=TILE,
        TILE_S=512,
        NB=16,
        ROUNDS=32,
        num_warps=8,
    )
    return tokens, logprobs
