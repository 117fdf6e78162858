"""Sampling on the device: per-request greedy / temperature / top-k / top-p / min-p with counter-based noise.

The random draw for a token depends only on (request seed, position, vocabulary index): a
request samples the same tokens alone or in any batch, in sync or async mode, and after a
restart. Sampling uses the Gumbel-max trick: ``argmax(logits / T + g)`` with Gumbel noise ``g``
draws from ``softmax(logits / T)`` restricted to the tokens the filters keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
INVALID_TOKEN = -1
"""Sampled in place of a token when the row's logits are not finite."""


@dataclass
class SamplingTensors:
    """Per-row sampling inputs, on the device, one row per sequence that samples this step."""

    temperature: torch.Tensor  # float32 [S]; 0 = greedy
    top_k: torch.Tensor  # int64 [S]; <= 0 = off
    top_p: torch.Tensor  # float32 [S]
    min_p: torch.Tensor  # float32 [S]
    seed: torch.Tensor  # int64 [S], non-negative, < 2**62
    position: torch.Tensor  # int64 [S]: index of the token being sampled in its sequence
    suppress: torch.Tensor  # int64 [S, K]: token ids to forbid (min_new_tokens); rows padded with their
    # first id, or all -1 when the row forbids nothing
    any_sampling: bool
    any_top_k_top_p: bool
    any_min_p: bool


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values below 2**32."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform draws in (0, 1), shape [S, vocab], a pure function of (seed, position, index)."""
    lo = seed & _M32
    hi = (seed >> 32) & _M32
    key = _mix32(lo ^ _mix32(hi ^ _mix32((position & _M32) ^ 0x5BD1E995)))
    idx = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)
    h = _mix32(((idx[None, :] * 0x9E3779B9) & _M32) ^ key[:, None])
    h = _mix32(h ^ ((key[:, None] * 0x85EBCA6B) & _M32))
    # 23 bits: with 24, the top value plus one half rounds to 1.0 in float32, whose Gumbel noise is +inf
    # (that token always won, and a filtered one came out as NaN, which argmax picks).
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def apply_filters(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, as masks of -inf; returns scaled logits."""
    temp = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature))
    scaled = logits / temp[:, None]
    if st.any_top_k_top_p:
        vocab = scaled.shape[-1]
        # Stable: tied tokens rank by index, on every device (the fused kernel keeps the same order).
        sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(st.top_k > 0, st.top_k.clamp(max=vocab), torch.full_like(st.top_k, vocab))
        drop = ranks >= k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= st.top_p[:, None]
        drop[:, 0] = False
        scaled = scaled.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), float("-inf"))
    if st.any_min_p:
        probs = scaled.softmax(dim=-1)
        threshold = st.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        scaled = scaled.masked_fill(probs < threshold, float("-inf"))
    return scaled


@dataclass
class TokenMask:
    """The tokens some rows may sample (constrained decoding): bit ``j`` of word ``w`` of a row allows
    token ``32 * w + j``."""

    rows: torch.Tensor  # int64 [R]: the masked sampling rows
    words: torch.Tensor  # int32 [R, ceil(vocab / 32)]


def allowed_tokens(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A bool [R, vocab_size] view of bitmask words (little-endian: byte k of word w holds tokens 32w + 8k..)."""
    shifts = torch.arange(8, device=words.device, dtype=torch.uint8)
    bits = (words.contiguous().view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    return bits.view(words.shape[0], -1)[:, :vocab_size].bool()


def apply_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """``logits`` (float32) with -inf at the tokens ``mask`` forbids in its rows (a new tensor)."""
    rows = logits[mask.rows].masked_fill(~allowed_tokens(mask.words, logits.shape[-1]), float("-inf"))
    return logits.index_put((mask.rows,), rows)


def sample(
    logits: torch.Tensor, st: SamplingTensors, want_logprobs: bool, mask: TokenMask | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row; also the model's log-probability of each chosen token.

    With ``mask``, its rows choose among the tokens it allows (the filters and the draw see only
    those); logprobs stay those of the model's own distribution."""
    logits = logits.float()
    raw = logits
    if mask is not None:
        logits = apply_mask(logits, mask)
    if st.suppress.shape[1] > 0:
        index = st.suppress.clamp(min=0)
        kept = logits.gather(1, index)
        logits = logits.scatter(1, index, torch.where(st.suppress >= 0, float("-inf"), kept))
    tokens = logits.argmax(dim=-1)
    if st.any_sampling:
        scaled = apply_filters(logits, st)
        gumbel = -torch.log(-torch.log(uniform_noise(st.seed, st.position, logits.shape[-1])))
        drawn = (scaled + gumbel).argmax(dim=-1)
        tokens = torch.where(st.temperature > 0, drawn, tokens)
    if want_logprobs:
        chosen = raw.gather(1, tokens[:, None]).squeeze(1)
        logprobs = chosen - torch.logsumexp(raw, dim=-1)
    else:
        logprobs = torch.zeros_like(tokens, dtype=torch.float32)
    # A row whose logits hold NaN or inf gets INVALID_TOKEN: that request fails, the others go on.
    tokens = torch.where(torch.isfinite(raw).all(dim=-1), tokens, INVALID_TOKEN)
    return tokens, logprobs


SCORE_CHUNK_ROWS = 256
"""Scored positions per log-softmax: bounds the float32 copy of the kept logits."""


def score_tokens(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logprobs_out: torch.Tensor,
    top_ids_out: torch.Tensor,
    top_logprobs_out: torch.Tensor,
) -> None:
    """Log-probability of each row's target token under the row's logits (log-softmax of the raw
    logits, as for sampled tokens), and the ``top_ids_out.shape[1]`` most likely tokens per row
    (descending; the order of tied tokens is unspecified)."""
    k = top_ids_out.shape[1]
    for lo in range(0, logits.shape[0], SCORE_CHUNK_ROWS):
        hi = min(lo + SCORE_CHUNK_ROWS, logits.shape[0])
        lsm = torch.log_softmax(logits[lo:hi].float(), dim=-1)
        logprobs_out[lo:hi] = lsm.gather(1, targets[lo:hi, None]).squeeze(1)
        if k:
            values, ids = lsm.topk(k, dim=-1)
            top_logprobs_out[lo:hi] = values
            top_ids_out[lo:hi] = ids


def top_logprobs(
    logits: torch.Tensor,
    ids_out: torch.Tensor,
    logprobs_out: torch.Tensor,
    tokens: torch.Tensor | None = None,
    token_logprobs: torch.Tensor | None = None,
) -> None:
    """The ``ids_out.shape[1]`` most likely tokens of each row (descending; the order of tied tokens is
    unspecified) and their logprobs under the raw logits (``x - logsumexp``, as for the chosen token's
    logprob), written into the outputs (fixed shapes: a CUDA graph can hold this).

    With the step's sampled ``tokens`` and their ``token_logprobs``, each row's log-sum-exp is
    recovered from them (``x[token] - logprob``) instead of another pass over the vocabulary, and
    the selection runs on the logits in their own dtype (no float32 copy of the whole row)."""
    k = ids_out.shape[1]
    if tokens is None or token_logprobs is None:
        raw = logits.float()
        values, ids = raw.topk(k, dim=-1)
        lse = torch.logsumexp(raw, dim=-1, keepdim=True)
    else:
        values, ids = logits.topk(k, dim=-1)
        chosen = logits.gather(1, tokens.clamp(min=0)[:, None]).float()
        lse = chosen - token_logprobs[:, None]
    logprobs_out.copy_(values.float() - lse)
    ids_out.copy_(ids)
