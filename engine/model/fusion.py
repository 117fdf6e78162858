"""Fuse the decoder layers of Llama-family models for the engine's steps.

Per layer, transformers' eager code launches some forty kernels on a decode step: seven for
each RMSNorm, ten for the rotary embedding, separate q/k/v and gate/up matmuls, copies into
the cache. Fused, a layer is about ten: RMSNorm, one q/k/v matmul, rotary + cache write,
attention, o_proj, residual add + RMSNorm, one gate/up matmul, SiLU-and-multiply, down_proj,
residual add.

The model keeps its modules and its state dict: the fused q/k/v and gate/up weights are
non-persistent buffers, and the original projection weights become views into them (no
memory is duplicated). The fused forwards run only inside an engine step; called anywhere
else (transformers' own ``generate``, a baseline), every module runs its original forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.attention import current_forward_context, reference_paged_attention
from engine.model.fused_kernels import add_rms_norm, rms_norm, rope_and_cache, silu_and_mul

_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")
_DECODER_LAYERS = {f"{f}DecoderLayer" for f in _FAMILIES}
_ATTENTIONS = {f"{f}Attention" for f in _FAMILIES}
_MLPS = {f"{f}MLP" for f in _FAMILIES}
_NORMS = {f"{f}RMSNorm" for f in _FAMILIES}


def _fuse_linears(owner: nn.Module, name: str, linears: list[nn.Linear]) -> None:
    """One weight (and bias) for ``linears``, stored on ``owner``; each linear's own becomes a view of it."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat(
            [
                lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                for lin in linears
            ]
        )
    owner.register_buffer(f"{name}_weight", weight, persistent=False)
    owner.register_buffer(f"{name}_bias", bias, persistent=False)
    row = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[row : row + rows]
        if lin.bias is not None:
            lin.bias.data = bias[row : row + rows]
        row += rows


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if current_forward_context() is None:
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if current_forward_context() is None:
        return type(self).forward(self, x)
    return self.down_proj(silu_and_mul(F.linear(x, self.gate_up_weight, self.gate_up_bias)))


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    ctx = current_forward_context()
    if ctx is None or hidden_states.shape[0] != 1:
        return type(self).forward(
            self,
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **kwargs,
        )
    x = hidden_states[0]
    tokens, d = x.shape[0], self.head_dim
    heads, kv_heads = self.q_proj.weight.shape[0] // d, self.k_proj.weight.shape[0] // d
    qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
    q = qkv[:, : heads * d].view(tokens, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(tokens, kv_heads, d)
    if hasattr(self, "q_norm"):
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    k_cache, v_cache = ctx.kv_caches[self.layer_idx]
    meta = ctx.metadata
    q = rope_and_cache(q, k, v, cos[0], sin[0], meta.slot_mapping, k_cache, v_cache)
    window = (
        self.sliding_window
        if hasattr(self, "sliding_window")
        else getattr(self.config, "sliding_window", None)
    )
    if ctx.use_kernels:
        from engine.model.kernels import paged_attention

        impl = "invariant" if ctx.batch_invariant else "auto"
        out = paged_attention(
            q, k_cache, v_cache, meta, self.scaling, window, None, impl=impl, scratch=ctx.scratch
        )
    else:
        out = reference_paged_attention(q, k_cache, v_cache, meta, self.scaling, window, None)
    return self.o_proj(out.reshape(1, tokens, heads * d)), None


def _decoder_layer_forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
    if current_forward_context() is None:
        return type(self).forward(
            self,
            hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    norm = self.post_attention_layernorm
    hidden_states, residual = add_rms_norm(hidden_states, residual, norm.weight, norm.variance_epsilon)
    return residual + self.mlp(hidden_states)


def _fusable(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)]
    if hasattr(attn, "q_norm"):
        norms += [attn.q_norm, attn.k_norm]
    return (
        type(layer).__name__ in _DECODER_LAYERS
        and type(attn).__name__ in _ATTENTIONS
        and type(mlp).__name__ in _MLPS
        and getattr(mlp.config, "hidden_act", None) == "silu"
        and all(type(n).__name__ in _NORMS for n in norms)
    )


def fuse_model(model: nn.Module) -> int:
    """Fuse every decoder layer of a supported family in place; returns how many were fused.

    Layers of other families (Gemma's (1 + weight) norms, softcaps, ...) are left as they are.
    """
    fused = 0
    for layer in getattr(getattr(model, "model", None), "layers", []):
        if not _fusable(layer) or hasattr(layer.self_attn, "qkv_weight"):
            continue
        attn, mlp = layer.self_attn, layer.mlp
        _fuse_linears(attn, "qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
        _fuse_linears(mlp, "gate_up", [mlp.gate_proj, mlp.up_proj])
        attn.forward = types.MethodType(_attention_forward, attn)
        mlp.forward = types.MethodType(_mlp_forward, mlp)
        for norm in (layer.input_layernorm, getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
            if norm is not None:
                norm.forward = types.MethodType(_norm_forward, norm)
        layer.forward = types.MethodType(_decoder_layer_forward, layer)
        fused += 1
    final_norm = getattr(getattr(model, "model", None), "norm", None)
    if fused and type(final_norm).__name__ in _NORMS:
        final_norm.forward = types.MethodType(_norm_forward, final_norm)
    return fused
