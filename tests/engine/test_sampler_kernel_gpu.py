"""The fused Triton sampler picks the reference sampler's tokens for the same seeds (CUDA only)."""

import zlib

import pytest
import torch

from engine.runner.sampler import INVALID_TOKEN, SamplingTensors, TokenMask, allowed_tokens, sample
from engine.runner.sampler_kernel import fused_sampler_available, sample_fused

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and fused_sampler_available(torch.device("cuda"))),
        reason="needs CUDA and Triton",
    ),
]

VOCABS = [32_000, 128_256, 151_936, 256_000]
BATCHES = [1, 7, 64, 256, 512]
MIXES = ["greedy", "temperature", "top_k", "top_p", "top_k_top_p", "min_p", "suppress", "all"]
ROW_KINDS = ["greedy", "temperature", "top_k", "top_p", "top_k_top_p", "min_p", "all_filters"]


def make_logits(rows: int, vocab: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random normal rows of several scales, half of them peaked on a few tokens, as a model gives."""
    gd = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0], device="cuda")[
        torch.randint(0, 4, (rows, 1), generator=gd, device="cuda")
    ]
    logits = torch.randn(rows, vocab, generator=gd, device="cuda") * scale
    ids = torch.randint(0, vocab, (rows, 4), generator=gd, device="cuda")
    boost = torch.tensor([14.0, 11.0, 9.0, 6.0], device="cuda") * (
        torch.rand(rows, 1, generator=gd, device="cuda") + 0.5
    )
    peaked = torch.rand(rows, 1, generator=gd, device="cuda") < 0.5
    logits.scatter_add_(1, ids, boost * peaked)
    return logits.to(dtype)


def make_tensors(rows: int, vocab: int, mix: str, g: torch.Generator) -> SamplingTensors:
    """Per-row parameters of one filter mix; 'all' draws each row's kind and adds suppression."""
    temperature = torch.rand(rows, generator=g) * 1.4 + 0.3
    top_k = torch.zeros(rows, dtype=torch.int64)
    top_p = torch.ones(rows)
    min_p = torch.zeros(rows)
    kinds = [mix] * rows
    if mix in ("all", "suppress"):
        kinds = [ROW_KINDS[i] for i in torch.randint(0, len(ROW_KINDS), (rows,), generator=g).tolist()]
    for r, kind in enumerate(kinds):
        if kind == "greedy":
            temperature[r] = 0.0
        if kind in ("top_k", "top_k_top_p", "all_filters"):
            top_k[r] = [1, 5, 50, 1000, vocab + 7][int(torch.randint(0, 5, (1,), generator=g))]
        if kind in ("top_p", "top_k_top_p", "all_filters"):
            top_p[r] = [0.3, 0.8, 0.9, 0.95, 0.99][int(torch.randint(0, 5, (1,), generator=g))]
        if kind in ("min_p", "all_filters"):
            min_p[r] = [0.01, 0.05, 0.1, 0.3][int(torch.randint(0, 4, (1,), generator=g))]
    suppress = torch.full((rows, 16), -1, dtype=torch.int64)
    if mix in ("all", "suppress"):
        for r in range(0, rows, 2):
            ids = torch.randint(0, vocab, (int(torch.randint(1, 17, (1,), generator=g)),), generator=g)
            suppress[r, :] = ids[0]
            suppress[r, : len(ids)] = ids
    sampling = temperature > 0
    st = SamplingTensors(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=torch.randint(0, 2**62, (rows,), generator=g),
        position=torch.randint(0, 100_000, (rows,), generator=g),
        suppress=suppress,
        any_sampling=bool(sampling.any()),
        any_top_k_top_p=bool((sampling & ((top_k > 0) | (top_p < 1))).any()),
        any_min_p=bool((sampling & (min_p > 0)).any()),
    )
    return SamplingTensors(*(v.cuda() if isinstance(v, torch.Tensor) else v for v in vars(st).values()))


def suppress_top_tokens(logits: torch.Tensor, st: SamplingTensors) -> None:
    """Make the rows that forbid tokens forbid their likeliest ones, so that suppression matters."""
    top = logits.float().topk(16, dim=-1).indices
    rows = (st.suppress[:, 0] >= 0).nonzero().flatten()
    st.suppress[rows] = top[rows]


def compare(logits: torch.Tensor, st: SamplingTensors, want_logprobs: bool = True) -> tuple[int, int]:
    """Mismatched tokens, rows; logprobs must agree wherever the tokens do."""
    ref_t, ref_lp = sample(logits, st, want_logprobs)
    ker_t, ker_lp = sample_fused(logits, st, want_logprobs)
    same = ref_t == ker_t
    ok = same & (ref_t != INVALID_TOKEN)
    torch.testing.assert_close(ker_lp[ok], ref_lp[ok], rtol=1e-5, atol=1e-5)
    return int((~same).sum()), len(same)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("mix", MIXES)
def test_kernel_tokens_equal_reference(mix, vocab, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(f"{mix} {vocab} {dtype}".encode()))
    mismatched = total = 0
    for rows in BATCHES:
        for _ in range(2 if rows >= 256 else 6):
            logits = make_logits(rows, vocab, dtype, g)
            st = make_tensors(rows, vocab, mix, g)
            if mix == "suppress":
                suppress_top_tokens(logits, st)
            bad, n = compare(logits, st)
            mismatched += bad
            total += n
    print(f"\n{mix} vocab={vocab} {dtype}: {mismatched} mismatched tokens of {total}")
    assert mismatched == 0


def test_non_finite_rows_are_invalid_and_others_unaffected():
    g = torch.Generator().manual_seed(5)
    logits = make_logits(64, 32_000, torch.float32, g)
    st = make_tensors(64, 32_000, "all", g)
    logits[3, 17] = float("nan")
    logits[10, 0] = float("inf")
    logits[11, 31_999] = float("-inf")
    logits[20, :] = float("-inf")
    ref_t, _ = sample(logits, st, True)
    ker_t, _ = sample_fused(logits, st, True)
    for r in (3, 10, 11, 20):
        assert ker_t[r] == INVALID_TOKEN
    assert torch.equal(ker_t, ref_t)


def test_without_logprobs_tokens_are_the_same_and_logprobs_zero():
    g = torch.Generator().manual_seed(6)
    logits = make_logits(100, 128_256, torch.bfloat16, g)
    st = make_tensors(100, 128_256, "all", g)
    with_lp, _ = sample_fused(logits, st, True)
    tokens, logprobs = sample_fused(logits, st, False)
    assert torch.equal(tokens, with_lp)
    assert torch.equal(tokens, sample(logits, st, False)[0])
    assert not logprobs.any()


def test_kernel_replays_in_a_cuda_graph():
    g = torch.Generator().manual_seed(7)
    rows, vocab = 128, 128_256
    logits = make_logits(rows, vocab, torch.bfloat16, g)
    st = make_tensors(rows, vocab, "all", g)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        sample_fused(logits, st, True)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            tokens, logprobs = sample_fused(logits, st, True)
    torch.cuda.synchronize()
    for _ in range(3):
        fresh = make_tensors(rows, vocab, "all", g)
        logits.copy_(make_logits(rows, vocab, torch.bfloat16, g))
        for name in ("temperature", "top_k", "top_p", "min_p", "seed", "position", "suppress"):
            getattr(st, name).copy_(getattr(fresh, name))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tokens, sample(logits, st, True)[0])


def random_mask(rows: int, vocab: int, g: torch.Generator) -> TokenMask:
    """Masks on about half the rows: some allow one token in a hundred, some half, some a single token."""
    gd = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    pick = torch.rand(rows, generator=gd, device="cuda") < 0.5
    pick[0] = True  # at least one masked row
    masked = torch.nonzero(pick).flatten()
    share = torch.tensor([0.01, 0.5, 0.0], device="cuda")[torch.arange(len(masked), device="cuda") % 3]
    allowed = torch.rand(len(masked), vocab, generator=gd, device="cuda") < share[:, None]
    allowed[
        torch.arange(len(masked), device="cuda"),
        torch.randint(0, vocab, (len(masked),), generator=gd, device="cuda"),
    ] = True
    padded = torch.nn.functional.pad(allowed, (0, -vocab % 32)).view(len(masked), -1, 32).long()
    words = (padded << torch.arange(32, device="cuda")).sum(-1)
    return TokenMask(masked, torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))


@pytest.mark.parametrize("vocab", [32_000, 151_936])
@pytest.mark.parametrize("mix", ["greedy", "temperature", "top_p", "top_k_top_p", "all"])
def test_masked_rows_equal_reference(mix, vocab):
    g = torch.Generator().manual_seed(zlib.crc32(f"mask {mix} {vocab}".encode()))
    for rows in (1, 64, 256):
        logits = make_logits(rows, vocab, torch.bfloat16, g)
        st = make_tensors(rows, vocab, mix, g)
        mask = random_mask(rows, vocab, g)
        ref_t, ref_lp = sample(logits, st, True, mask=mask)
        ker_t, ker_lp = sample_fused(logits, st, True, mask=mask)
        assert torch.equal(ker_t, ref_t), f"{rows} rows: {int((ker_t != ref_t).sum())} differ"
        torch.testing.assert_close(ker_lp, ref_lp, rtol=1e-5, atol=1e-5)
        allowed = allowed_tokens(mask.words, vocab)
        assert allowed[torch.arange(len(mask.rows), device="cuda"), ker_t[mask.rows]].all()
