"""The Triton paged-attention kernel agrees with the PyTorch reference path (CUDA only)."""

import pytest
import torch

from engine.model.attention import reference_paged_attention
from engine.model.kernels import kernels_available
from engine_helpers import random_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not kernels_available(), reason="needs CUDA and Triton")]


CASES = [
    # context lens, query lens, heads, kv heads, head dim, block size
    ([1, 7, 300, 64], [1, 1, 1, 1], 32, 8, 128, 16),
    ([40, 129, 5], [40, 17, 1], 8, 2, 64, 16),
    ([33, 70], [33, 3], 4, 4, 64, 8),
    ([600, 2], [1, 2], 16, 1, 256, 32),
    ([1000, 517, 90, 1], [1, 1, 90, 1], 28, 4, 128, 16),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 30.0)])
def test_triton_paged_attention_matches_reference(case, dtype, window, softcap):
    from engine.model.kernels import paged_attention

    q, kc, vc, meta = random_step(*case, dtype=dtype, seed=len(case[0]))
    scale = case[4] ** -0.5
    expected = reference_paged_attention(q, kc, vc, meta, scale, window, softcap).float()
    got = paged_attention(q, kc, vc, meta, scale, window, softcap).float()
    assert not torch.isnan(got).any()
    rel = (got - expected).norm() / expected.norm()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-5), rel


SINK_CASES = CASES[:2] + [([300, 256, 64, 900], [300, 128, 1, 1], 8, 2, 64, 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", SINK_CASES)
@pytest.mark.parametrize("impl", ["auto", "tiled", "per_token"])
@pytest.mark.parametrize("window", [None, 24])
def test_attention_sinks_match_reference(case, dtype, impl, window):
    """gpt-oss's sinks (a per-head logit in each denominator) in every kernel path: the
    per-token kernel with and without split-K, the tiled kernel, and the mixed dispatch."""
    from engine.model.kernels import paged_attention

    q, kc, vc, meta = random_step(*case, dtype=dtype, seed=7 + len(case[0]))
    heads = case[2]
    gen = torch.Generator().manual_seed(heads)
    sinks = (torch.randn(heads, generator=gen) * 2.0).to(device=q.device, dtype=dtype)
    scale = case[4] ** -0.5
    expected = reference_paged_attention(q, kc, vc, meta, scale, window, None, sinks).float()
    plain = reference_paged_attention(q, kc, vc, meta, scale, window, None).float()
    got = paged_attention(q, kc, vc, meta, scale, window, None, impl=impl, sinks=sinks).float()
    assert not torch.isnan(got).any()
    rel = (got - expected).norm() / expected.norm()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-5), rel
    assert (plain - expected).norm() / expected.norm() > 0.05  # the sinks matter in this test
