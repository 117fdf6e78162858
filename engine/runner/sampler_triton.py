"""Device functions of the fused sampler (Triton): noise, order-preserving keys, tile loads and the
passes over a range of a row's vocabulary that ``sampler_kernel`` runs split over programs or whole.

A row's context is passed as ``row_ptr`` (its logits), ``V`` (vocabulary), ``sup`` (token ids it
suppresses), ``mptr`` / ``mon`` (its token-mask words, and whether it has a mask). Every pass
returns partial results over tiles ``[lo, hi)``; partials of consecutive ranges combine in range
order (``sampler_kernel``), ties going to the lower index as in one pass over the whole row.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: sampler.sample is used
    triton = None


if triton is not None:
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
    def mix32(x):
        x = (x ^ (x >> 16)) * tl.full((), 0x7FEB352D, tl.uint32)
        x = (x ^ (x >> 15)) * tl.full((), 0x846CA68B, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def row_key(seed, pos):
        """The noise key of a row: ``sampler.uniform_noise``'s ``key`` of (seed, position)."""
        rkey = mix32((pos & 0xFFFFFFFF).to(tl.uint32) ^ tl.full((), 0x5BD1E995, tl.uint32))
        rkey = mix32(((seed >> 32) & 0xFFFFFFFF).to(tl.uint32) ^ rkey)
        return mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ rkey)

    @triton.jit
    def gumbel(key, idx):
        h = mix32((idx.to(tl.uint32) * tl.full((), 0x9E3779B9, tl.uint32)) ^ key)
        h = mix32(h ^ (key * tl.full((), 0x85EBCA6B, tl.uint32)))
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        return -_log(-_log(u))

    @triton.jit
    def key_of(s):
        """Order-preserving int32 key of a float32 (-0.0 and 0.0 share one key, as they compare equal)."""
        b = s.to(tl.int32, bitcast=True)
        k = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
        return tl.where(s == 0.0, 0, k)

    @triton.jit
    def unkey(k):
        return tl.where(k >= 0, k, k ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)

    @triton.jit
    def load_tile(
        row_ptr, start, V, sup, mptr, mon, TILE: tl.constexpr, HAS_SUP: tl.constexpr, HAS_MASK: tl.constexpr
    ):
        """Indices, validity, raw logits and suppressed (and masked) logits of one tile (float32)."""
        idx = start + tl.arange(0, TILE)
        valid = idx < V
        x = tl.load(row_ptr + idx, mask=valid, other=float("-inf")).to(tl.float32)
        xs = x
        if HAS_SUP:
            hits = tl.sum(((sup >= start) & (sup < start + TILE)).to(tl.int32), axis=0)
            if hits > 0:
                hit = tl.sum((idx[:, None] == sup[None, :]).to(tl.int32), axis=1) > 0
                xs = tl.where(hit, float("-inf"), x)
        if HAS_MASK:  # noqa: SIM102 (a compile-time and a run-time condition)
            if mon:
                words = tl.load(mptr + (idx >> 5), mask=valid, other=0)
                allowed = ((words >> (idx & 31)) & 1) != 0
                xs = tl.where(allowed, xs, float("-inf"))
        return idx, valid, x, xs

    @triton.jit
    def first_max(vals, idxs):
        """The largest of ``vals`` and, among lanes holding it, the lowest index (lanes keep their first)."""
        best = tl.max(vals, axis=0)
        return best, tl.min(tl.where(vals == best, idxs, 2147483647), axis=0)

    @triton.jit
    def pass1_range(
        row_ptr,
        lo,
        hi,
        V,
        sup,
        mptr,
        mon,
        rkey,
        Td,
        sampling,
        SAMPLING: tl.constexpr,
        WANT_LP: tl.constexpr,
        TILE: tl.constexpr,
        HAS_SUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        """Raw max and sum of exp (log-sum-exp partial), non-finite count, greedy argmax (after
        suppression and mask) and the candidate ``argmax(logits / T + gumbel)`` over tiles ``[lo, hi)``.

        Each lane keeps its own running results across tiles (no reduction inside the loop, which
        would stall every tile); the lanes are reduced once at the end."""
        m_vec = tl.full((TILE,), -3.0e38, tl.float32)
        z_vec = tl.zeros((TILE,), tl.float32)
        bad_vec = tl.zeros((TILE,), tl.int32)
        g_vec = tl.full((TILE,), float("-inf"), tl.float32)
        gi_vec = tl.zeros((TILE,), tl.int32)
        c_vec = tl.full((TILE,), float("-inf"), tl.float32)
        ci_vec = tl.zeros((TILE,), tl.int32)
        for start in range(lo, hi, TILE):
            idx, valid, x, xs = load_tile(row_ptr, start, V, sup, mptr, mon, TILE, HAS_SUP, HAS_MASK)
            bad_vec += (valid & ~(tl.abs(x) < float("inf"))).to(tl.int32)
            if WANT_LP:
                m_new = tl.maximum(m_vec, x)
                z_vec = z_vec * tl.exp(m_vec - m_new) + tl.exp(x - m_new)
                m_vec = m_new
            up = xs > g_vec
            g_vec = tl.where(up, xs, g_vec)
            gi_vec = tl.where(up, idx, gi_vec)
            if SAMPLING:  # noqa: SIM102 (a compile-time and a run-time condition)
                if sampling:
                    v = tl.where(valid, tl.math.div_rn(xs, Td) + gumbel(rkey, idx), float("-inf"))
                    up = v > c_vec
                    c_vec = tl.where(up, v, c_vec)
                    ci_vec = tl.where(up, idx, ci_vec)
        m_raw = tl.max(m_vec, axis=0)
        z_raw = tl.sum(z_vec * tl.exp(m_vec - m_raw), axis=0)
        g_val, g_idx = first_max(g_vec, gi_vec)
        c_val, c_idx = first_max(c_vec, ci_vec)
        g_idx = tl.where(g_val == float("-inf"), 0, g_idx)
        c_idx = tl.where(c_val == float("-inf"), 0, c_idx)
        return m_raw, z_raw, tl.sum(bad_vec, axis=0), g_val, g_idx, c_val, c_idx

    @triton.jit
    def check_range(
        row_ptr,
        lo,
        hi,
        V,
        sup,
        mptr,
        mon,
        Td,
        m_s,
        kc,
        c_idx,
        kB,
        TILE: tl.constexpr,
        HAS_SUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        """Over tiles ``[lo, hi)``: the count and mass (exp(s - m_s)) of tokens ranked before the
        candidate (key ``kc``, index ``c_idx``), the total mass, and the mass of tokens with key above ``kB``."""
        before_n = tl.zeros((TILE,), tl.int32)
        before_m = tl.zeros((TILE,), tl.float32)
        z_all = tl.zeros((TILE,), tl.float32)
        mass_k = tl.zeros((TILE,), tl.float32)
        for start in range(lo, hi, TILE):
            idx, valid, x, xs = load_tile(row_ptr, start, V, sup, mptr, mon, TILE, HAS_SUP, HAS_MASK)
            s = tl.math.div_rn(xs, Td)
            key = key_of(s)
            e = tl.where(valid, tl.exp(s - m_s), 0.0)
            before = valid & ((key > kc) | ((key == kc) & (idx < c_idx)))
            before_n += before.to(tl.int32)
            before_m += tl.where(before, e, 0.0)
            z_all += e
            mass_k += tl.where(key > kB, e, 0.0)
        return (
            tl.sum(before_n, axis=0),
            tl.sum(before_m, axis=0),
            tl.sum(z_all, axis=0),
            tl.sum(mass_k, axis=0),
        )

    @triton.jit
    def round_range(
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
        TILE: tl.constexpr,
        HAS_SUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        """One round over tiles ``[lo, hi)``: the count and mass of tokens ranked before candidate
        ``cand`` (key ``k_cand``), and the Gumbel-max draw among them (the next candidate)."""
        before_n = tl.zeros((TILE,), tl.int32)
        before_m = tl.zeros((TILE,), tl.float32)
        n_vec = tl.full((TILE,), float("-inf"), tl.float32)
        ni_vec = tl.zeros((TILE,), tl.int32)
        for start in range(lo, hi, TILE):
            idx, valid, x, xs = load_tile(row_ptr, start, V, sup, mptr, mon, TILE, HAS_SUP, HAS_MASK)
            s = tl.math.div_rn(xs, Td)
            key = key_of(s)
            before = valid & ((key > k_cand) | ((key == k_cand) & (idx < cand)))
            before_n += before.to(tl.int32)
            before_m += tl.where(before, tl.exp(s - m_s), 0.0)
            v = tl.where(before, s + gumbel(rkey, idx), float("-inf"))
            up = v > n_vec
            n_vec = tl.where(up, v, n_vec)
            ni_vec = tl.where(up, idx, ni_vec)
        n_val, n_idx = first_max(n_vec, ni_vec)
        n_idx = tl.where(n_val == float("-inf"), 0, n_idx)
        return tl.sum(before_n, axis=0), tl.sum(before_m, axis=0), n_val, n_idx

    @triton.jit
    def accepts(before_n, before_m, Z, e_cand, k_eff, use_p, top_p, min_p, MINP: tl.constexpr):
        """Whether the filters keep a candidate with ``before_n`` tokens of mass ``before_m`` ranked before it."""
        ok = (before_n < k_eff) & (~use_p | (before_n == 0) | (before_m / Z < top_p))
        if MINP:
            ok = ok & (e_cand >= min_p)
        return ok

    @triton.jit
    def search(
        row_ptr,
        V,
        sup,
        mptr,
        mon,
        T,
        m_s,
        lo,
        hi,
        top_p,
        Z,
        TILE: tl.constexpr,
        NB: tl.constexpr,
        HAS_SUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        """Narrow [lo, hi] to one key: the top-p boundary (by mass; top-k uses ``kth_key``).

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
                idx, valid, x, xs = load_tile(row_ptr, start, V, sup, mptr, mon, TILE, HAS_SUP, HAS_MASK)
                s = tl.math.div_rn(xs, T)
                key = key_of(s)
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
    def digit_hist_range(
        row_ptr,
        lo,
        hi,
        V,
        sup,
        mptr,
        mon,
        T,
        prefix,
        shift,
        TILE: tl.constexpr,
        HAS_SUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        """256-bin histogram, over tiles ``[lo, hi)``, of the byte at ``shift`` of the scaled logits'
        unsigned order keys, among the tokens whose higher bytes are ``prefix``'s."""
        hist = tl.zeros((256,), tl.int32)
        for start in range(lo, hi, TILE):
            idx, valid, x, xs = load_tile(row_ptr, start, V, sup, mptr, mon, TILE, HAS_SUP, HAS_MASK)
            u = key_of(tl.math.div_rn(xs, T)).to(tl.int64) + 2147483648  # unsigned order
            match = valid & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=match)
        return hist

    @triton.jit
    def radix_digit(hist, prefix, need, above, shift):
        """One radix-select step: the byte at ``shift`` of the ``need``-th largest key among those sharing
        ``prefix`` (from their histogram ``hist``). Returns the longer prefix, the rank sought among
        the tokens sharing it, the count of tokens above it, and the count sharing it."""
        bins = tl.arange(0, 256)
        higher = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0)  # tokens in bins above each bin
        ok = (higher < need) & (need <= higher + hist)
        d = tl.max(tl.where(ok, bins, -1), axis=0)
        sel = bins == d
        gt = tl.sum(tl.where(sel, higher, 0), axis=0)
        cnt = tl.sum(tl.where(sel, hist, 0), axis=0)
        return prefix + (d.to(tl.int64) << shift), need - gt, above + gt, cnt

    @triton.jit
    def kth_key(
        row_ptr, V, sup, mptr, mon, T, k, TILE: tl.constexpr, HAS_SUP: tl.constexpr, HAS_MASK: tl.constexpr
    ):
        """Radix select of the ``k``-th largest scaled logit: its key and the count of tokens strictly
        above it (four passes, one byte of the order-preserving key each, a 256-bin histogram)."""
        prefix = tl.zeros((), tl.int64)  # the key's bytes fixed so far, as an unsigned value
        need = k  # the rank sought among the tokens that share the prefix (1-based)
        above = tl.zeros((), tl.int32)
        for j in tl.static_range(4):
            hist = digit_hist_range(
                row_ptr, 0, V, V, sup, mptr, mon, T, prefix, 24 - 8 * j, TILE, HAS_SUP, HAS_MASK
            )
            prefix, need, above, _ = radix_digit(hist, prefix, need, above, 24 - 8 * j)
        return prefix - 2147483648, above

    @triton.jit
    def topk_range(
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
        kB,
        TILE: tl.constexpr,
        HAS_SUP: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        """Over tiles ``[lo, hi)``: the Gumbel-max draw among the tokens with key ``kB`` or above, and
        the mass (exp(s - m_s)) of those strictly above ``kB``."""
        n_vec = tl.full((TILE,), float("-inf"), tl.float32)
        ni_vec = tl.zeros((TILE,), tl.int32)
        mass = tl.zeros((TILE,), tl.float32)
        for start in range(lo, hi, TILE):
            idx, valid, x, xs = load_tile(row_ptr, start, V, sup, mptr, mon, TILE, HAS_SUP, HAS_MASK)
            s = tl.math.div_rn(xs, Td)
            key = key_of(s)
            mass += tl.where(valid & (key > kB), tl.exp(s - m_s), 0.0)
            v = tl.where(valid & (key >= kB), s + gumbel(rkey, idx), float("-inf"))
            up = v > n_vec
            n_vec = tl.where(up, v, n_vec)
            ni_vec = tl.where(up, idx, ni_vec)
        n_val, n_idx = first_max(n_vec, ni_vec)
        return n_val, tl.where(n_val == float("-inf"), 0, n_idx), tl.sum(mass, axis=0)
