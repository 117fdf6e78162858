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
