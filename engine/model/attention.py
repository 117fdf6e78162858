"""Paged attention, registered with transformers' attention interface.

The model code stays transformers'; each attention layer calls :func:`paged_attention_forward`
with the new tokens' queries, keys and values (packed: batch 1, all sequences' tokens in a
row). It writes the keys and values into the paged cache at the step's slots, then attends
each query to its own sequence's cached keys through the block table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "batchgen_paged"
HARMLESS_KWARGS = frozenset(
    {"position_ids", "use_cache", "cache_position", "output_attentions", "output_router_logits", "is_causal"}
)
"""Keywords a model's attention may pass that do not change the result here (the cache is ours, the
attention is causal); any other keyword with a value is refused, see ``paged_attention_forward``."""


class UnsupportedAttentionError(ValueError):
    """The model's attention asks for something the paged attention does not implement."""


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and which keys each query sees.

    Sequences are numbered ``0..B-1`` in input order; token ``t`` belongs to sequence
    ``query_seq[t]``, is its ``query_index[t]``-th new token, and sits at ``positions[t]``.
    ``context_lens[b]`` counts sequence ``b``'s cached tokens after this step's are written.
    """

    slot_mapping: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    query_seq: torch.Tensor  # int64 [T]
    query_index: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int64 [B, max_blocks]
    context_lens: torch.Tensor  # int64 [B]
    max_query_len: int
    max_context_len: int


@dataclass
class ForwardContext:
    """State the attention layers read during one forward pass."""

    metadata: AttentionMetadata
    kv_caches: list[
        tuple[torch.Tensor, torch.Tensor]
    ]  # per layer: [num_blocks, block_size, kv_heads, head_dim]
    use_kernels: bool = False
    batch_invariant: bool = False
    """Attention in the kernel whose reduction order depends on the query alone (``engine.model.batch_invariant``)."""
    scratch: dict = field(default_factory=dict)
    """Per-pass values that every layer shares (the attention kernels' tile table), built on first use."""


_context: ForwardContext | None = None


def set_forward_context(ctx: ForwardContext | None) -> None:
    global _context
    _context = ctx


def current_forward_context() -> ForwardContext | None:
    """The context of the engine step being run, or None outside one."""
    return _context


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("paged attention called outside an engine step (no forward context set)")
    return _context


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys/values ([T, kv_heads, head_dim]) at their cache slots."""
    kvh, d = k_cache.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def reference_paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch paged attention over a padded per-sequence layout (the CPU path and the test oracle).

    ``query``: [T, heads, head_dim]; returns [T, heads, head_dim]. ``sinks`` [heads]: a logit per
    head that joins each softmax's denominator and attends to nothing (gpt-oss's attention sinks).
    """
    num_tokens, heads, d = query.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = heads // kvh
    batch = meta.context_lens.shape[0]
    q_len, ctx_len = meta.max_query_len, meta.max_context_len
    num_blocks = -(-ctx_len // block_size)

    offsets = torch.arange(block_size, device=query.device)
    slots = (meta.block_tables[:, :num_blocks, None] * block_size + offsets).reshape(batch, -1)[:, :ctx_len]
    keys = k_cache.view(-1, kvh, d)[slots].float().permute(0, 2, 1, 3)  # [B, kvh, L, d]
    values = v_cache.view(-1, kvh, d)[slots].float().permute(0, 2, 1, 3)

    padded_q = query.new_zeros((batch, q_len, heads, d), dtype=torch.float32)
    padded_q[meta.query_seq, meta.query_index] = query.float()
    q_pos = torch.full((batch, q_len), -1, dtype=torch.int64, device=query.device)
    q_pos[meta.query_seq, meta.query_index] = meta.positions
    k_pos = torch.arange(ctx_len, device=query.device)
    visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
        k_pos[None, None, :] < meta.context_lens[:, None, None]
    )
    if sliding_window is not None:
        visible &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    visible[:, :, 0] |= q_pos < 0  # padding rows: see one key, never read back

    qg = padded_q.view(batch, q_len, kvh, group, d).permute(0, 2, 3, 1, 4)  # [B, kvh, g, Q, d]
    scores = torch.einsum("bhgqd,bhld->bhgql", qg, keys) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    if sinks is None:
        probs = scores.softmax(dim=-1)
    else:
        sink = sinks.float().view(1, kvh, group, 1, 1).expand(batch, kvh, group, q_len, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    out = torch.einsum("bhgql,bhld->bhgqd", probs, values)
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, q_len, heads, d)
    return out[meta.query_seq, meta.query_index].to(query.dtype)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry: [1, H, T, d] in, [1, T, H, d] out.

    ``s_aux`` (attention sinks, gpt-oss) is implemented; a keyword that is neither implemented nor
    harmless raises UnsupportedAttentionError instead of being dropped (the engine probes one
    forward at start, so a new architecture fails there, loudly).
    """
    sinks = kwargs.pop("s_aux", None)
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in HARMLESS_KWARGS)
    if kwargs.get("is_causal") is False:
        unknown.append("is_causal=False")
    if unknown:
        raise UnsupportedAttentionError(
            f"{type(module).__name__} passes {', '.join(unknown)} to its attention function, which the "
            "paged attention does not implement"
        )
    ctx = get_forward_context()
    k_cache, v_cache = ctx.kv_caches[module.layer_idx]
    q = query[0].transpose(0, 1)  # [T, H, d]
    write_kv(k_cache, v_cache, key[0].transpose(0, 1), value[0].transpose(0, 1), ctx.metadata.slot_mapping)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if ctx.use_kernels:
        from engine.model.kernels import paged_attention

        out = paged_attention(
            q,
            k_cache,
            v_cache,
            ctx.metadata,
            scale,
            sliding_window,
            softcap,
            impl="invariant" if ctx.batch_invariant else "auto",
            scratch=ctx.scratch,
            sinks=sinks,
        )
    else:
        out = reference_paged_attention(
            q, k_cache, v_cache, ctx.metadata, scale, sliding_window, softcap, sinks
        )
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
