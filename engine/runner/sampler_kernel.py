"""Fused sampling on CUDA (Triton): the semantics of ``sampler.sample`` without sorting the vocabulary.

One program per row walks the row's logits in tiles. Pass 1 finds the row's raw log-sum-exp and
finiteness, the greedy argmax (after suppression) and the candidate: the argmax of
``logits / T + gumbel`` over the whole vocabulary, with the noise hashed in-kernel exactly as
``uniform_noise`` does. The filters (top-k, top-p, min-p) keep a prefix of the tokens in
descending order of scaled logit (ties by index, as the reference's sort leaves them), and the
Gumbel-max draw over a prefix is the global candidate whenever the candidate lies in it: a cheap
check pass decides that. A top-k row first finds its boundary by a radix select (four passes,
one byte of the values' order-preserving integer keys each, a 256-bin histogram). When the
candidate is rejected, a top-k row (with or without the other filters) draws over its kept prefix
directly; a top-p or min-p row without top-k uses rounds instead: the kept prefix lies wholly
before the rejected candidate, so the draw over the tokens before it is the next candidate, one
pass per round that checks a candidate and draws the next (a share of about 1 - top_p of the rows
needs them, mostly one or two). The top-p boundary under a top-k limit, or after ``ROUNDS``
rounds, is found by a search over the keys (each pass splits the bracket into ``NB`` bins and
narrows it to the data of one bin), followed by one pass that picks the boundary among tied
tokens and one pass that draws over the prefix. The launch has fixed shapes and no host syncs,
so it can be captured in a CUDA graph.

Known differences from the reference, all at float-rounding boundaries: probability masses are
summed in another order (a token whose mass before it equals top_p to the last bit may go either
way), min-p compares ``exp(s - max) >= min_p`` rather than the ratio of two rounded softmax values,
and the reference's cumulative sum can round to 1.0 and drop the last, vanishing tail tokens of a
row with top_p == 1 that the kernel keeps.
"""

from __future__ import annotations

import os

import torch

from engine.runner.sampler import INVALID_TOKEN, SamplingTensors

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: sampler.sample is used
    triton = None


def fused_sampler_available(device: torch.device) -> bool:
    """Whether ``sample_fused`` can run on ``device``."""
    return triton is not None and device.type == "cuda"


if triton is not None:
    _INVALID = tl.constexpr(INVALID_TOKEN)
    # The reference's noise uses torch.log, which is CUDA's correctly specified logf; the interpreter
    # (CPU tests of the kernel's logic) has no libdevice.
    if os.environ.get("TRITON_INTERPRET") == "1":

        @triton.jit
        def _log(x):
            return tl.log(x)

    else:

        @triton.jit
        def _log(x):
            return libdevice.log(x)

    @triton.jit
    def _mix32(x):
        x = (x ^ (x >> 16)) * tl.full((), 0x7FEB352D, tl.uint32)
        x = (x ^ (x >> 15)) * tl.full((), 0x846CA68B, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _gumbel(key, idx):
        h = _mix32((idx.to(tl.uint32) * tl.full((), 0x9E3779B9, tl.uint32)) ^ key)
        h = _mix32(h ^ (key * tl.full((), 0x85EBCA6B, tl.uint32)))
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        return -_log(-_log(u))

    @triton.jit
    def _key(s):
        """Order-preserving int32 key of a float32 (-0.0 and 0.0 share one key, as they compare equal)."""
        b = s.to(tl.int32, bitcast=True)
        k = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
        return tl.where(s == 0.0, 0, k)

    @triton.jit
    def _unkey(k):
        return tl.where(k >= 0, k, k ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_tile(row_ptr, start, V, sup, TILE: tl.constexpr, HAS_SUP: tl.constexpr):
        """Indices, validity, raw logits and suppressed logits of one tile (float32)."""
        idx = start + tl.arange(0, TILE)
        valid = idx < V
        x = tl.load(row_ptr + idx, mask=valid, other=float("-inf")).to(tl.float32)
        xs = x
        if HAS_SUP:
            hits = tl.sum(((sup >= start) & (sup < start + TILE)).to(tl.int32), axis=0)
            if hits > 0:
                hit = tl.sum((idx[:, None] == sup[None, :]).to(tl.int32), axis=1) > 0
                xs = tl.where(hit, float("-inf"), x)
        return idx, valid, x, xs

    @triton.jit
    def _search(
        row_ptr,
        V,
        sup,
        T,
        m_s,
        lo,
        hi,
        top_p,
        Z,
        TILE: tl.constexpr,
        NB: tl.constexpr,
        HAS_SUP: tl.constexpr,
    ):
        """Narrow [lo, hi] to one key: the top-p boundary (by mass; top-k uses ``_kth_key``).

        Returns the key, the count and the mass (exp(s - m_s)) of the tokens strictly above it.
        """
        bins = tl.arange(0, NB)
        above = tl.zeros((), tl.int32)
        mass_above = tl.zeros((), tl.float32)
        it = tl.zeros((), tl.int32)
        while (lo < hi) & (it < 64):
            inv = NB / (hi - lo + 1).to(tl.float32)
            cnt = tl.zeros((NB,), tl.int32)
            mass = tl.zeros((NB,), tl.float32)
            mn = tl.full((NB,), 2147483647, tl.int32)
            mx = tl.full((NB,), -2147483647 - 1, tl.int32)
            for start in range(0, V, TILE):
                idx, valid, x, xs = _load_tile(row_ptr, start, V, sup, TILE, HAS_SUP)
                s = tl.math.div_rn(xs, T)
                key = _key(s)
                inb = valid & (key >= lo) & (key <= hi)
                b = ((key.to(tl.int64) - lo).to(tl.float32) * inv).to(tl.int32)
                b = tl.minimum(tl.maximum(b, 0), NB - 1)
                oh = (b[:, None] == bins[None, :]) & inb[:, None]
                cnt += tl.sum(oh.to(tl.int32), axis=0)
                e = tl.exp(s - m_s)
                mass += tl.sum(tl.where(oh, e[:, None], 0.0), axis=0)
                mn = tl.minimum(mn, tl.min(tl.where(oh, key[:, None], 2147483647), axis=0))
                mx = tl.maximum(mx, tl.max(tl.where(oh, key[:, None], -2147483647 - 1), axis=0))
            higher = bins[None, :] > bins[:, None]  # [b, b']: bin b' lies above bin b
            cnt_hi = tl.sum(tl.where(higher, cnt[None, :], 0), axis=1)
            mass_hi = tl.sum(tl.where(higher, mass[None, :], 0.0), axis=1)
            ok = (cnt > 0) & ((mass_above + mass_hi) / Z < top_p)
            pick = tl.min(tl.where(ok, bins, NB), axis=0)
            sel = bins == pick
            lo = tl.sum(tl.where(sel, mn, 0), axis=0).to(tl.int64)
            hi = tl.sum(tl.where(sel, mx, 0), axis=0).to(tl.int64)
            above += tl.sum(tl.where(sel, cnt_hi, 0), axis=0)
            mass_above += tl.sum(tl.where(sel, mass_hi, 0.0), axis=0)
            it += 1
        return lo, above, mass_above

    @triton.jit
    def _kth_key(row_ptr, V, sup, T, k, TILE: tl.constexpr, HAS_SUP: tl.constexpr):
        """Radix select of the ``k``-th largest scaled logit: its key and the count of tokens strictly
        above it (four passes, one byte of the order-preserving key each, a 256-bin histogram)."""
        bins = tl.arange(0, 256)
        prefix = tl.zeros((), tl.int64)  # the key's bytes fixed so far, as an unsigned value
        need = k  # the rank sought among the tokens that share the prefix (1-based)
        above = tl.zeros((), tl.int32)
        for j in tl.static_range(4):
            shift = 24 - 8 * j
            hist = tl.zeros((256,), tl.int32)
            for start in range(0, V, TILE):
                idx, valid, x, xs = _load_tile(row_ptr, start, V, sup, TILE, HAS_SUP)
                u = _key(tl.math.div_rn(xs, T)).to(tl.int64) + 2147483648  # unsigned order
                match = valid
                if j > 0:
                    match = valid & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
                digit = ((u >> shift) & 255).to(tl.int32)
                hist += tl.histogram(digit, 256, mask=match)
            higher = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0)  # tokens in bins above each bin
            ok = (higher < need) & (need <= higher + hist)
            d = tl.max(tl.where(ok, bins, -1), axis=0)
            gt = tl.sum(tl.where(bins == d, higher, 0), axis=0)
            need -= gt
            above += gt
            prefix += d.to(tl.int64) << shift
        return prefix - 2147483648, above

    @triton.jit
    def _sample_kernel(
        X,
        stride_x,
        Temp,
        TopK,
        TopP,
        MinP,
        Seed,
        Pos,
        Sup,
        stride_sup,
        Tokens,
        Logprobs,
        V,
        K_SUP: tl.constexpr,
        HAS_SUP: tl.constexpr,
        SAMPLING: tl.constexpr,
        TOPKP: tl.constexpr,
        MINP: tl.constexpr,
        WANT_LP: tl.constexpr,
        TILE: tl.constexpr,
        TILE_S: tl.constexpr,
        NB: tl.constexpr,
        ROUNDS: tl.constexpr,
    ):
        row = tl.program_id(0)
        row_ptr = X + row.to(tl.int64) * stride_x
        if HAS_SUP:
            sup = tl.load(Sup + row.to(tl.int64) * stride_sup + tl.arange(0, K_SUP)).to(tl.int32)
        else:
            sup = tl.zeros((K_SUP,), tl.int32)
        T = tl.load(Temp + row)
        sampling = T > 0.0
        seed = tl.load(Seed + row)
        pos = tl.load(Pos + row)
        rkey = _mix32((pos & 0xFFFFFFFF).to(tl.uint32) ^ tl.full((), 0x5BD1E995, tl.uint32))
        rkey = _mix32(((seed >> 32) & 0xFFFFFFFF).to(tl.uint32) ^ rkey)
        rkey = _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ rkey)
        Td = tl.where(sampling, T, 1.0)

        # Pass 1: raw log-sum-exp and finiteness, greedy argmax, candidate draw over all tokens.
        m_raw = tl.full((), -3.0e38, tl.float32)
        z_raw = tl.zeros((), tl.float32)
        bad = tl.zeros((), tl.int32)
        g_val = tl.full((), float("-inf"), tl.float32)
        g_idx = tl.zeros((), tl.int32)
        c_val = tl.full((), float("-inf"), tl.float32)
        c_idx = tl.zeros((), tl.int32)
        for start in range(0, V, TILE):
            idx, valid, x, xs = _load_tile(row_ptr, start, V, sup, TILE, HAS_SUP)
            bad += tl.sum((valid & ~(tl.abs(x) < float("inf"))).to(tl.int32), axis=0)
            if WANT_LP:
                m_new = tl.maximum(m_raw, tl.max(x, axis=0))
                z_raw = z_raw * tl.exp(m_raw - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m_raw = m_new
            t_val, t_idx = tl.max(xs, axis=0, return_indices=True, return_indices_tie_break_left=True)
            if t_val > g_val:
                g_val = t_val
                g_idx = start + t_idx
            if SAMPLING:  # noqa: SIM102 (a compile-time and a run-time condition)
                if sampling:
                    v = tl.where(valid, tl.math.div_rn(xs, Td) + _gumbel(rkey, idx), float("-inf"))
                    t_val, t_idx = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
                    if t_val > c_val:
                        c_val = t_val
                        c_idx = start + t_idx
        finite = bad == 0
        tok = g_idx

        if SAMPLING:  # noqa: SIM102
            if sampling & finite:
                tok = c_idx
                if TOPKP or MINP:
                    m_s = tl.math.div_rn(g_val, Td)
                    xc = tl.load(row_ptr + c_idx).to(tl.float32)
                    s_c = tl.math.div_rn(xc, Td)  # the candidate is never a suppressed token
                    kc = _key(s_c)
                    e_c = tl.exp(s_c - m_s)
                    KEY_LOW = _key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
                    # The kept prefix: tokens with key above kB, and the first nB tokens with key kB.
                    kB = KEY_LOW
                    nB = V
                    Z = tl.zeros((), tl.float32)
                    accept = tl.full((), 1, tl.int1)
                    use_k = tl.full((), 0, tl.int1)
                    use_p = tl.full((), 0, tl.int1)
                    k_eff = V
                    top_p = 1.0
                    if TOPKP:
                        top_k = tl.load(TopK + row)
                        top_p = tl.load(TopP + row)
                        use_k = (top_k > 0) & (top_k < V)
                        use_p = top_p < 1.0
                        k_eff = tl.where(use_k, top_k, V).to(tl.int32)
                        if use_k:
                            kB, above_k = _kth_key(row_ptr, V, sup, Td, k_eff, TILE_S, HAS_SUP)
                            nB = k_eff - above_k
                        # Check pass: the candidate's rank and the mass above it.
                        before_n = tl.zeros((), tl.int32)
                        before_m = tl.zeros((), tl.float32)
                        z_all = tl.zeros((), tl.float32)
                        mass_k = tl.zeros((), tl.float32)
                        for start in range(0, V, TILE):
                            idx, valid, x, xs = _load_tile(row_ptr, start, V, sup, TILE, HAS_SUP)
                            s = tl.math.div_rn(xs, Td)
                            key = _key(s)
                            e = tl.where(valid, tl.exp(s - m_s), 0.0)
                            before = valid & ((key > kc) | ((key == kc) & (idx < c_idx)))
                            before_n += tl.sum(before.to(tl.int32), axis=0)
                            before_m += tl.sum(tl.where(before, e, 0.0), axis=0)
                            z_all += tl.sum(e, axis=0)
                            mass_k += tl.sum(tl.where(key > kB, e, 0.0), axis=0)
                        if use_k:  # the top-k set's mass: the tokens above kB and nB of those at kB
                            Z = mass_k + nB.to(tl.float32) * tl.exp(_unkey(kB.to(tl.int32)) - m_s)
                        else:
                            Z = z_all
                        accept = accept & (before_n < k_eff)
                        accept = accept & (~use_p | (before_n == 0) | (before_m / Z < top_p))
                    if MINP:
                        min_p = tl.load(MinP + row)
                        accept = accept & (e_c >= min_p)
                    else:
                        min_p = 0.0
                    if accept == 0 and use_k == 0:
                        # Rounds: the kept set is a prefix of the order, so it lies wholly before a
                        # rejected candidate; the draw over what lies before it is the next candidate.
                        cand = c_idx
                        rounds = tl.zeros((), tl.int32)
                        while (accept == 0) & (rounds < ROUNDS):
                            s_cand = tl.math.div_rn(tl.load(row_ptr + cand).to(tl.float32), Td)
                            k_cand = _key(s_cand)
                            before_n = tl.zeros((), tl.int32)
                            before_m = tl.zeros((), tl.float32)
                            n_val = tl.full((), float("-inf"), tl.float32)
                            n_idx = tl.zeros((), tl.int32)
                            for start in range(0, V, TILE):
                                idx, valid, x, xs = _load_tile(row_ptr, start, V, sup, TILE, HAS_SUP)
                                s = tl.math.div_rn(xs, Td)
                                key = _key(s)
                                before = valid & ((key > k_cand) | ((key == k_cand) & (idx < cand)))
                                before_n += tl.sum(before.to(tl.int32), axis=0)
                                before_m += tl.sum(tl.where(before, tl.exp(s - m_s), 0.0), axis=0)
                                v = tl.where(before, s + _gumbel(rkey, idx), float("-inf"))
                                t_val, t_idx = tl.max(
                                    v, axis=0, return_indices=True, return_indices_tie_break_left=True
                                )
                                if t_val > n_val:
                                    n_val = t_val
                                    n_idx = start + t_idx
                            ok = (before_n < k_eff) & (~use_p | (before_n == 0) | (before_m / Z < top_p))
                            if MINP:
                                ok = ok & (tl.exp(s_cand - m_s) >= min_p)
                            accept = ok
                            cand = tl.where(ok, cand, n_idx)
                            rounds += 1
                        tok = cand
                    if accept == 0:  # top-k with top-p, or a row the rounds did not settle: search
                        if use_p:
                            lo = tl.where(use_k, kB, KEY_LOW)
                            hi = _key(m_s).to(tl.int64)
                            kp, above_p, mass_p = _search(
                                row_ptr, V, sup, Td, m_s, lo, hi, top_p, Z, TILE_S, NB, HAS_SUP
                            )
                            e_p = tl.exp(_unkey(kp.to(tl.int32)) - m_s)
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
                                idx, valid, x, xs = _load_tile(row_ptr, start, V, sup, TILE, HAS_SUP)
                                key = _key(tl.math.div_rn(xs, Td))
                                tie = valid & (key == kB)
                                rank = tl.cumsum(tie.to(tl.int32), axis=0) + run
                                iB = tl.minimum(iB, tl.min(tl.where(tie & (rank == nB), idx, V), axis=0))
                                run += tl.sum(tie.to(tl.int32), axis=0)
                        # Draw over the kept prefix.
                        c_val = tl.full((), float("-inf"), tl.float32)
                        c_idx = tl.zeros((), tl.int32)
                        for start in range(0, V, TILE):
                            idx, valid, x, xs = _load_tile(row_ptr, start, V, sup, TILE, HAS_SUP)
                            s = tl.math.div_rn(xs, Td)
                            key = _key(s)
                            keep = valid & ((key > kB) | ((key == kB) & (idx <= iB)))
                            if MINP:
                                keep = keep & (tl.exp(s - m_s) >= min_p)
                            v = tl.where(keep, s + _gumbel(rkey, idx), float("-inf"))
                            t_val, t_idx = tl.max(
                                v, axis=0, return_indices=True, return_indices_tie_break_left=True
                            )
                            if t_val > c_val:
                                c_val = t_val
                                c_idx = start + t_idx
                        tok = c_idx
        if WANT_LP:  # noqa: SIM108
            lp = tl.load(row_ptr + tok).to(tl.float32) - (m_raw + tl.log(z_raw))
        else:
            lp = 0.0
        tl.store(Tokens + row, tl.where(finite, tok.to(tl.int64), _INVALID))
        tl.store(Logprobs + row, lp)


def sample_fused(
    logits: torch.Tensor, st: SamplingTensors, want_logprobs: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sampler.sample`` in one Triton launch: the same tokens for the same seeds (CUDA only)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return tokens, logprobs
    sup = st.suppress
    k_sup = sup.shape[1]
    if k_sup & (k_sup - 1):  # pad to a power of two with ids that match no token
        sup = torch.cat([sup, sup.new_full((rows, triton.next_power_of_2(k_sup) - k_sup), -1)], dim=1)
    if k_sup == 0:
        sup = tokens[:, None]  # unread
    _sample_kernel[(rows,)](
        logits,
        logits.stride(0),
        st.temperature,
        st.top_k,
        st.top_p,
        st.min_p,
        st.seed,
        st.position,
        sup,
        sup.stride(0),
        tokens,
        logprobs,
        vocab,
        K_SUP=max(sup.shape[1], 1),
        HAS_SUP=k_sup > 0,
        SAMPLING=st.any_sampling,
        TOPKP=st.any_top_k_top_p,
        MINP=st.any_min_p,
        WANT_LP=want_logprobs,
        TILE=2048,
        TILE_S=512,
        NB=16,
        ROUNDS=32,
        num_warps=8,
    )
    return tokens, logprobs
