"""Fused decoder layers: which models are fused, that the model stays transformers' model, and
that the fused kernels agree with transformers' own operations (CUDA part)."""

import pytest
import torch

from engine import SamplingParams
from engine.model.fused_kernels import add_rms_norm, rms_norm, rope_and_cache, silu_and_mul
from engine.model.kernels import kernels_available
from engine_helpers import assert_matches_reference, random_step
from tiny_models import hf_greedy, make_llm, random_prompts, reference_model

FUSED_ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
needs_triton = pytest.mark.skipif(not kernels_available(), reason="needs CUDA and Triton")


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_llama_family_layers_are_fused_and_share_their_weights(arch):
    llm = make_llm(arch)
    model = llm.engine.model
    assert llm.engine.fused_layers == model.config.num_hidden_layers
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_weight.untyped_storage().data_ptr()
    assert torch.equal(attn.qkv_weight[-attn.v_proj.weight.shape[0] :], attn.v_proj.weight)
    assert not any("qkv" in k or "gate_up" in k for k in model.state_dict())


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_other_families_are_left_as_they_are(arch):
    assert make_llm(arch).engine.fused_layers == 0


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_fused_and_unfused_engines_agree_with_transformers(arch):
    prompts = random_prompts(6, [5, 40, 1, 17, 33, 9], seed=3)
    max_new = [12, 7, 20, 3, 16, 9]
    fused = make_llm(arch, max_batch_tokens=24)  # chunked prefills as well
    unfused = make_llm(arch, max_batch_tokens=24, fused_kernels=False)
    assert unfused.engine.fused_layers == 0
    params = [SamplingParams(temperature=0, max_new_tokens=m) for m in max_new]
    a = [o.outputs[0].token_ids for o in fused.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in unfused.generate(prompts, params)]
    assert a == b
    assert_matches_reference(fused, prompts, max_new)


def test_fused_model_still_runs_transformers_generate_outside_the_engine():
    llm = make_llm("llama")
    prompt = random_prompts(1, [11])[0]
    before = llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8))[0].outputs[0].token_ids
    model = llm.engine.model
    model.set_attn_implementation("eager")
    try:
        assert hf_greedy(model, prompt, 8) == hf_greedy(reference_model(llm), prompt, 8) == before
    finally:
        model.set_attn_implementation("batchgen_paged")


# -- the Triton kernels against transformers' operations (run on the CPU in the same dtype) ------


def _close(fast: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> None:
    fast, ref = fast.float().cpu(), ref.float().cpu()
    assert torch.isfinite(fast).all()
    err = (fast - ref).norm() / ref.norm().clamp(min=1e-6)
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,width", [(1, 64), (32, 4096), (300, 2048), (7, 5120)])
def test_norm_kernels_match_transformers_math(rows, width, dtype):
    g = torch.Generator().manual_seed(rows)
    x, res = torch.randn(2, rows, width, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(dtype)
    _close(rms_norm(x.cuda(), w.cuda(), 1e-5), rms_norm(x, w, 1e-5))
    normed, summed = add_rms_norm(x.cuda(), res.cuda(), w.cuda(), 1e-6)
    ref_normed, ref_summed = add_rms_norm(x, res, w, 1e-6)
    _close(normed, ref_normed)
    assert torch.equal(summed.cpu(), ref_summed)
    gate_up = torch.randn(rows, 2 * width, generator=g).to(dtype) * 3
    _close(silu_and_mul(gate_up.cuda()), silu_and_mul(gate_up))


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_and_cache_kernel_matches_transformers_math(dtype):
    device = "cuda"
    context_lens, query_lens = [1, 7, 300, 64, 40], [1, 1, 1, 1, 40]
    heads, kv_heads, d, bs = 8, 2, 128, 16
    q, k_cache, v_cache, meta = random_step(context_lens, query_lens, heads, kv_heads, d, bs, dtype, seed=5)
    tokens = q.shape[0]
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g).to(device, dtype)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    q, k, v = q.view(tokens, heads, d), k.view(tokens, kv_heads, d), v.view(tokens, kv_heads, d)
    angles = meta.positions.float()[:, None].cpu() * (1e4 ** (-torch.arange(0, d, 2) / d))
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    k_ref, v_ref = k_cache.cpu().clone(), v_cache.cpu().clone()
    q_out = rope_and_cache(q, k, v, cos.to(device), sin.to(device), meta.slot_mapping, k_cache, v_cache)
    q_ref = rope_and_cache(q.cpu(), k.cpu(), v.cpu(), cos, sin, meta.slot_mapping.cpu(), k_ref, v_ref)
    _close(q_out, q_ref)
    _close(k_cache, k_ref)
    assert torch.equal(v_cache.cpu(), v_ref)
