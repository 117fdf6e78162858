"""Greedy outputs equal transformers' generate token for token, for every supported architecture."""

import pytest
import torch

from engine import SamplingParams
from engine_helpers import assert_matches_reference
from tiny_models import ARCHS, devices, hf_greedy, make_llm, random_prompts, reference_model

ARCH_NAMES = list(ARCHS)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_single_request_matches_transformers(arch, device):
    llm = make_llm(arch, device)
    assert_matches_reference(llm, random_prompts(1, [23]), [24])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_batch_of_16_with_varied_lengths_matches_transformers(arch, device):
    llm = make_llm(arch, device)
    prompts = random_prompts(16, seed=1)
    max_new = [4 + (i * 7) % 29 for i in range(16)]
    assert_matches_reference(llm, prompts, max_new)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_chunked_prefill_matches_transformers(arch, device):
    llm = make_llm(arch, device, max_batch_tokens=16)
    prompts = random_prompts(4, [40, 70, 17, 33], seed=2)
    assert_matches_reference(llm, prompts, [12, 9, 15, 10])
    records = llm.engine.pop_step_records()
    assert max(r.prefill_tokens + r.decode_tokens for r in records) <= 16
    assert sum(r.prefill_tokens for r in records) >= 40 + 70 + 17 + 33


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_preemption_matches_transformers(arch, device):
    # 20 usable blocks of 8 tokens for 8 requests that each grow to ~60 tokens: some must be preempted.
    llm = make_llm(arch, device, num_blocks=21, max_num_seqs=8)
    prompts = random_prompts(8, [30, 25, 35, 20, 28, 33, 22, 26], seed=3)
    assert_matches_reference(llm, prompts, [30] * 8)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma"])
def test_shared_prefixes_hit_the_prefix_cache_and_match_transformers(arch, device):
    llm = make_llm(arch, device)
    (system,) = random_prompts(1, [35], seed=4)
    tails = random_prompts(6, [3, 9, 14, 1, 20, 6], seed=5)
    prompts = [system + t for t in tails]
    assert_matches_reference(llm, prompts[:2], [10, 10])
    assert_matches_reference(llm, prompts[2:], [12, 8, 10, 16])
    assert llm.engine.block_manager.prefix_hit_blocks >= 4 * (35 // 8)


def test_n_samples_share_the_prompt_blocks():
    llm = make_llm("llama")
    prompt = random_prompts(1, [50], seed=6)[0]
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_new_tokens=8))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert llm.engine.block_manager.prefix_hit_blocks >= 3 * (49 // 8)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


@pytest.mark.parametrize("device", devices())
def test_prompts_as_text_and_chat_messages(device):
    from tiny_models import tokenizer

    tok = tokenizer()
    llm = make_llm("qwen2", device, tok=tok)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    text_out, chat_out = llm.generate(
        ["Once upon a time", chat], SamplingParams(temperature=0, max_new_tokens=6)
    )
    assert text_out.prompt_token_ids == tok("Once upon a time").input_ids
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert chat_out.prompt_token_ids == tok(rendered, add_special_tokens=False).input_ids
    for out in (text_out, chat_out):
        sample = out.outputs[0]
        assert sample.text == tok.decode(sample.token_ids, skip_special_tokens=True)
        assert sample.token_ids == hf_greedy(reference_model(llm), out.prompt_token_ids, 6)


def test_logprobs_are_the_models_log_softmax_of_chosen_tokens():
    llm = make_llm("llama")
    prompt = random_prompts(1, [12], seed=8)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_new_tokens=5, logprobs=True))[0].outputs[0]
    ref = reference_model(llm)
    ids = torch.tensor([prompt + out.token_ids])
    with torch.inference_mode():
        logp = ref(ids).logits[0].log_softmax(-1)
    expected = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("device", devices())
def test_attention_sinks_match_transformers(device):
    """gpt-oss: sinks in every softmax, alternating sliding and full attention, MoE (on CUDA
    through the Triton kernels' sink term)."""
    import transformers

    from engine import LLM
    from tiny_models import _COMMON

    config = transformers.GptOssConfig(
        **{
            **_COMMON,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        }
    )
    llm = LLM(config, None, dtype="float32", device=device, num_blocks=256, block_size=8)
    with torch.no_grad():  # random sinks: with zeros they would hardly change the result
        for layer in llm.engine.model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    assert_matches_reference(llm, random_prompts(4, [23, 9, 30, 14], seed=5), [16, 12, 10, 14])


def test_an_attention_keyword_the_engine_does_not_implement_is_refused_at_start(monkeypatch):
    import engine.model.attention as attention

    # Gemma's attention passes position_ids; pretend it is a keyword that changes the result.
    monkeypatch.setattr(attention, "HARMLESS_KWARGS", attention.HARMLESS_KWARGS - {"position_ids"})
    with pytest.raises(
        attention.UnsupportedAttentionError, match="model family 'gemma' is not supported.*position_ids"
    ):
        make_llm("gemma")
