"""The roofline's byte and FLOP counts on a tiny model, against numbers worked out by hand."""

import pytest
import torch
from transformers import LlamaConfig

from bench.floor import measure_matmul_rate, model_costs, workload_roofline
from engine.build import meta_model

# hidden 16, 2 layers, 4 heads of 4, 2 KV heads, intermediate 32, vocab 100, float32 (4 bytes).
# One layer: q 16x16 + k 16x8 + v 16x8 + o 16x16 + gate, up, down 16x32 each + two norms of 16 = 2336.
# Body (all but the embedding table and lm_head): 2 x 2336 + final norm 16 = 4688. Table, lm_head: 100 x 16.
SHAPE = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=64,
)
BODY, TABLE = 4688, 1600
# Prompt 3 + 2 new tokens, prompt 5 + 4 new tokens; at most 2 sequences per step.
REQUESTS = [([1, 2, 3], 2), ([4, 5, 6, 7, 8], 4)]
STEPS = 4  # the longest request's 4 tokens (6 generated / 2 per step = 3 is fewer)
PROCESSED = (3 + 2 - 1) + (5 + 4 - 1)  # the last generated token is never fed back: 12
CONTEXT_READS = (2 * 3 + 0 + 1) + (4 * 5 + 0 + 1 + 2 + 3)  # generated token i reads p + i positions: 33
ATTENDED = (1 + 2 + 3 + 4) + (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8)  # position j attends j + 1 positions: 46
PROMPT_TOKENS = 8
KV_PER_TOKEN = 2 * 2 * 2 * 4 * 4  # K and V, 2 layers, 2 KV heads, head_dim 4, 4 bytes: 128
ATTENTION_PER_CONTEXT = 4 * 2 * 4 * 4  # 4 x layers x heads x head_dim: 128


def _model(tied: bool):
    return meta_model(LlamaConfig(**SHAPE, tie_word_embeddings=tied), torch.float32)


def test_untied_embedding_rows_are_read_per_token_and_lm_head_whole_per_step():
    model = _model(tied=False)
    costs = model_costs(model)
    assert (costs.body_params, costs.lm_head_params) == (BODY, TABLE)
    assert costs.step_weight_bytes == (BODY + TABLE) * 4  # lm_head, not the input table
    assert costs.embedding_bytes_per_token == 16 * 4
    assert costs.kv_bytes_per_token == KV_PER_TOKEN
    assert costs.attention_flops_per_context == ATTENTION_PER_CONTEXT

    roof = workload_roofline(model, REQUESTS, max_num_seqs=2, bandwidth_gbs=1.0, matmul_tflops=1.0)
    assert roof.steps == STEPS
    assert roof.weight_bytes == STEPS * (BODY + TABLE) * 4 == 100_608
    assert roof.embedding_bytes == PROCESSED * 64 == 768
    assert roof.kv_read_bytes == CONTEXT_READS * KV_PER_TOKEN == 4_224
    assert roof.kv_write_bytes == PROMPT_TOKENS * KV_PER_TOKEN == 1_024
    assert roof.bytes == 106_624
    assert roof.linear_flops == 2 * BODY * PROCESSED + 2 * TABLE * 6 == 131_712
    assert roof.attention_flops == ATTENTION_PER_CONTEXT * ATTENDED == 5_888
    assert roof.flops == 137_600


def test_tied_embeddings_count_the_table_once_as_lm_head():
    model = _model(tied=True)
    assert sum(p.numel() for p in model.parameters()) == BODY + TABLE
    costs = model_costs(model)
    assert costs.step_weight_bytes == (BODY + TABLE) * 4
    assert costs.embedding_bytes_per_token == 0
    roof = workload_roofline(model, REQUESTS, max_num_seqs=2, bandwidth_gbs=1.0, matmul_tflops=1.0)
    assert roof.bytes == 100_608 + 0 + 4_224 + 1_024
    assert roof.flops == 137_600


def test_one_sequence_per_step_takes_a_step_per_generated_token():
    roof = workload_roofline(_model(tied=False), REQUESTS, 1, bandwidth_gbs=1.0, matmul_tflops=1.0)
    assert roof.steps == 6


@pytest.mark.parametrize(
    ("bandwidth_gbs", "matmul_tflops", "bound"),
    [(1e-6, 1.0, "bandwidth"), (1e6, 1e-9, "compute")],
)
def test_the_bound_is_the_larger_time(bandwidth_gbs, matmul_tflops, bound):
    roof = workload_roofline(_model(tied=False), REQUESTS, 2, bandwidth_gbs, matmul_tflops)
    assert roof.memory_s == pytest.approx(106_624 / (bandwidth_gbs * 1e9))
    assert roof.compute_s == pytest.approx(137_600 / (matmul_tflops * 1e12))
    assert roof.bound == bound
    assert roof.seconds == max(roof.memory_s, roof.compute_s)
    as_dict = roof.to_dict()
    assert as_dict["bound"] == bound and as_dict["seconds"] == roof.seconds and as_dict["bytes"] == 106_624


def test_tensor_parallel_ranks_split_the_kv_and_attention():
    costs = model_costs(_model(tied=False), kv_split=2)
    assert costs.kv_bytes_per_token == KV_PER_TOKEN // 2
    assert costs.attention_flops_per_context == ATTENTION_PER_CONTEXT // 2


def test_matmul_rate_on_the_cpu_says_what_it_measured():
    tflops, note = measure_matmul_rate(torch.device("cpu"), size=64, repeats=2)
    assert tflops > 0
    assert note == "float32 64x64x64 matmul on cpu"
