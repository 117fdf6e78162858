"""The fused sampler's split launches (Triton): each runs one program per (row, chunk of ``CH`` tokens),
so that a step's few hundred rows fill the GPU, and leaves partial results that the next launch (or
the final one, ``sampler_kernel``) combines in chunk order.

- ``pass1_kernel``: raw log-sum-exp, finiteness, greedy argmax, and the candidate draw over the whole
  vocabulary (rows without a top-k limit).
- ``radix_kernel`` (pass ``j`` of 4) and ``topk_draw_kernel``: a top-k row's boundary by radix select
  over the chunks' histograms, then the draw over its top-k set (the candidate of such a row; the
  tokens tied at the boundary are kept by index, counted per chunk from the last histogram) and
  that set's mass.
- ``check_round_kernel``: ``r`` = 0 the check pass of each filtered row's candidate (its rank and the
  mass before it), ``r`` >= 1 round ``r`` (settle the previous candidate; if rejected, draw the next
  among the tokens before it).

State between launches is per row (written by the row's chunk 0) and per (row, chunk) partials, in
buffers of two generations so that a launch reads the previous one's while writing its own.
"""

from __future__ import annotations

from engine.runner.sampler_triton import (
    accepts,
    check_range,
    digit_hist_range,
    key_of,
    pass1_range,
    radix_digit,
    round_range,
    row_key,
    topk_range,
    triton,
    unkey,
)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def row_context(
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
    def row_filters(TopK, TopP, MinP, row, V, TOPKP: tl.constexpr, MINP: tl.constexpr):
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
    def combine_pass1(PF, PI, row, S, SP: tl.constexpr):
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
    def combine_round(RF, RI, buf, rows, row, S, SP: tl.constexpr):
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
    def radix_state(HS, npass, rows, row, S, SP: tl.constexpr, k_eff):
        """A top-k row's radix select after ``npass`` passes (their histograms summed over chunks): the
        key prefix, the rank sought among the tokens sharing it, the count above it and the count sharing it."""
        c = tl.arange(0, SP)
        bins = tl.arange(0, 256)
        prefix = tl.zeros((), tl.int64)
        need = k_eff
        above = tl.zeros((), tl.int32)
        cnt = tl.zeros((), tl.int32)
        for j in range(npass):
            base = ((j * rows + row).to(tl.int64) * SP + c) * 256
            h = tl.load(HS + base[:, None] + bins[None, :], mask=(c < S)[:, None], other=0)
            prefix, need, above, cnt = radix_digit(tl.sum(h, axis=0), prefix, need, above, 24 - 8 * j)
        return prefix, need, above, cnt

    @triton.jit
    def topk_candidate(HS, TF, TI, rows, row, S, SP: tl.constexpr, k_eff, m_s):
        """A top-k row's boundary key kB, how many tokens at kB are kept (nB), its candidate (the draw
        over the top-k set) and the set's mass."""
        prefix, need, above, cnt = radix_state(HS, 4, rows, row, S, SP, k_eff)
        kB = prefix - 2147483648
        c = tl.arange(0, SP)
        ok = c < S
        base = (row.to(tl.int64) * SP + c) * 2
        vals = tl.load(TF + base, mask=ok, other=float("-inf"))
        _, j = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
        c_k = tl.sum(tl.where(c == j, tl.load(TI + row.to(tl.int64) * SP + c, mask=ok, other=0), 0), axis=0)
        mass = tl.sum(tl.load(TF + base + 1, mask=ok, other=0.0), axis=0)
        Z_k = mass + need.to(tl.float32) * tl.exp(unkey(kB.to(tl.int32)) - m_s)
        return kB, need, c_k, Z_k

    @triton.jit
    def pass1_kernel(X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, TopK, TopP, MinP, Seed, Pos, PF,
                     PI, V, SP: tl.constexpr, K_SUP: tl.constexpr, HAS_SUP: tl.constexpr,
                     HAS_MASK: tl.constexpr, SAMPLING: tl.constexpr, TOPKP: tl.constexpr, WANT_LP: tl.constexpr,
                     CH: tl.constexpr, TILE: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        c = tl.program_id(1)
        row_ptr, sup, mptr, mon, sampling, Td, rkey = row_context(
            X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, Seed, Pos, row, K_SUP, HAS_SUP, HAS_MASK
        )
        use_k, use_p, k_eff, top_p, min_p = row_filters(TopK, TopP, MinP, row, V, TOPKP, False)
        lo = c * CH
        m_raw, z_raw, bad, g_val, g_idx, c_val, c_idx = pass1_range(
            row_ptr, lo, tl.minimum(lo + CH, V), V, sup, mptr, mon, rkey, Td, sampling & ~use_k,
            SAMPLING, WANT_LP, TILE, HAS_SUP, HAS_MASK,
        )  # fmt: skip
        base = (row.to(tl.int64) * SP + c) * 4
        tl.store(PF + base, m_raw)
        tl.store(PF + base + 1, z_raw)
        tl.store(PF + base + 2, g_val)
        tl.store(PF + base + 3, c_val)
        tl.store(PI + base, bad)
        tl.store(PI + base + 1, g_idx)
        tl.store(PI + base + 2, c_idx)

    # Launch sizes vary by step: not specialising on them keeps one compiled kernel for every step size.
    @triton.jit(do_not_specialize=["rows", "S", "j"])
    def radix_kernel(X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, TopK, TopP, MinP, Seed, Pos, PF,
                     PI, HS, V, rows, S, j, SP: tl.constexpr, K_SUP: tl.constexpr, HAS_SUP: tl.constexpr,
                     HAS_MASK: tl.constexpr, CH: tl.constexpr, TILE: tl.constexpr):  # fmt: skip
        """Pass ``j`` of a top-k row's radix select: this chunk's histogram of the key's byte ``j``."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        row_ptr, sup, mptr, mon, sampling, Td, rkey = row_context(
            X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, Seed, Pos, row, K_SUP, HAS_SUP, HAS_MASK
        )
        use_k, use_p, k_eff, top_p, min_p = row_filters(TopK, TopP, MinP, row, V, True, False)
        m_raw, z_raw, bad, g_val, g_idx, c_idx = combine_pass1(PF, PI, row, S, SP)
        if sampling & (bad == 0) & use_k:
            prefix, need, above, cnt = radix_state(HS, j, rows, row, S, SP, k_eff)
            lo = c * CH
            hist = digit_hist_range(
                row_ptr,
                lo,
                tl.minimum(lo + CH, V),
                V,
                sup,
                mptr,
                mon,
                Td,
                prefix,
                24 - 8 * j,
                TILE,
                HAS_SUP,
                HAS_MASK,
            )
            tl.store(HS + ((j * rows + row).to(tl.int64) * SP + c) * 256 + tl.arange(0, 256), hist)

    @triton.jit(do_not_specialize=["rows", "S"])
    def topk_draw_kernel(X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, TopK, TopP, MinP, Seed, Pos,
                         PF, PI, HS, TF, TI, V, rows, S, SP: tl.constexpr, K_SUP: tl.constexpr,
                         HAS_SUP: tl.constexpr, HAS_MASK: tl.constexpr, CH: tl.constexpr, TILE: tl.constexpr):  # fmt: skip
        """A top-k row's draw over its top-k set and the set's mass above the boundary, in this chunk."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        row_ptr, sup, mptr, mon, sampling, Td, rkey = row_context(
            X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, Seed, Pos, row, K_SUP, HAS_SUP, HAS_MASK
        )
        use_k, use_p, k_eff, top_p, min_p = row_filters(TopK, TopP, MinP, row, V, True, False)
        m_raw, z_raw, bad, g_val, g_idx, c_idx = combine_pass1(PF, PI, row, S, SP)
        if sampling & (bad == 0) & use_k:
            prefix, need, above, cnt = radix_state(HS, 4, rows, row, S, SP, k_eff)
            # Tokens tied at the boundary key, per chunk: the last pass's histogram bin of its last byte.
            cs = tl.arange(0, SP)
            ties = tl.load(
                HS + ((3 * rows + row).to(tl.int64) * SP + cs) * 256 + (prefix & 255), mask=cs < S, other=0
            )
            lo = c * CH
            n_val, n_idx, mass = topk_range(
                row_ptr, lo, tl.minimum(lo + CH, V), V, sup, mptr, mon, rkey, Td, tl.math.div_rn(g_val, Td),
                prefix - 2147483648, need, tl.sum(tl.where(cs < c, ties, 0), axis=0),
                tl.sum(tl.where(cs == c, ties, 0), axis=0), TILE, HAS_SUP, HAS_MASK,
            )  # fmt: skip
            base = (row.to(tl.int64) * SP + c) * 2
            tl.store(TF + base, n_val)
            tl.store(TF + base + 1, mass)
            tl.store(TI + row.to(tl.int64) * SP + c, n_idx)

    @triton.jit(do_not_specialize=["rows", "S", "r"])
    def check_round_kernel(X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, TopK, TopP, MinP, Seed, Pos,
                           PF, PI, HS, TF, TI, RF, RI, SF, SI, V, rows, S, r, SP: tl.constexpr,
                           K_SUP: tl.constexpr, HAS_SUP: tl.constexpr, HAS_MASK: tl.constexpr,
                           TOPKP: tl.constexpr, MINP: tl.constexpr, CH: tl.constexpr, TILE: tl.constexpr):  # fmt: skip
        """``r`` = 0: the check pass of each filtered row's candidate; ``r`` >= 1: round ``r``. Rows that are
        not sampling or have no top-p / min-p filter are skipped."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        row_ptr, sup, mptr, mon, sampling, Td, rkey = row_context(
            X, stride_x, Sup, stride_sup, Mrow, M, stride_m, Temp, Seed, Pos, row, K_SUP, HAS_SUP, HAS_MASK
        )
        use_k, use_p, k_eff, top_p, min_p = row_filters(TopK, TopP, MinP, row, V, TOPKP, MINP)
        m_raw, z_raw, bad, g_val, g_idx, c_idx = combine_pass1(PF, PI, row, S, SP)
        m_s = tl.math.div_rn(g_val, Td)
        cand0 = c_idx
        Z_k = tl.zeros((), tl.float32)
        if TOPKP:  # noqa: SIM102 (a compile-time and a run-time condition)
            # The top-k candidate and set mass start the check (r = 0) and are settled by round 1; later
            # rounds read the row's state, and rows without a top-p / min-p filter never need them here.
            if use_k & (r < 2) & (use_p | (min_p > 0.0)):
                kB, nB, cand0, Z_k = topk_candidate(HS, TF, TI, rows, row, S, SP, k_eff, m_s)
        if sampling & (bad == 0) & (use_p | (min_p > 0.0)):
            lo = c * CH
            hi = tl.minimum(lo + CH, V)
            cur = r % 2
            if r == 0:
                kc = key_of(tl.math.div_rn(tl.load(row_ptr + cand0).to(tl.float32), Td))
                KEY_LOW = key_of(tl.full((), float("-inf"), tl.float32))
                before_n, before_m, z_all, _ = check_range(
                    row_ptr, lo, hi, V, sup, mptr, mon, Td, m_s, kc, cand0, KEY_LOW, TILE, HAS_SUP, HAS_MASK
                )
                # The candidate's set mass: the whole row's, or (top-k) the top-k set's, carried by chunk 0.
                third = tl.where(use_k, tl.where(c == 0, Z_k, 0.0), z_all)
                base = ((cur * rows + row).to(tl.int64) * SP + c) * 2
                tl.store(RI + base, before_n)
                tl.store(RF + base, before_m)
                tl.store(RF + base + 1, third)
            else:
                prev = 1 - cur
                if r == 1:  # settle the check pass
                    before_n, before_m, Z, _ = combine_round(RF, RI, prev, rows, row, S, SP)
                    e_c = tl.exp(tl.math.div_rn(tl.load(row_ptr + cand0).to(tl.float32), Td) - m_s)
                    done = accepts(before_n, before_m, Z, e_c, k_eff, use_p, top_p, min_p, MINP)
                    cand = cand0
                else:  # settle round r - 1
                    cand = tl.load(SI + (prev * rows + row) * 2)
                    done = tl.load(SI + (prev * rows + row) * 2 + 1) != 0
                    Z = tl.load(SF + prev * rows + row)
                    if done == 0:
                        before_n, before_m, _, n_idx = combine_round(RF, RI, prev, rows, row, S, SP)
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
