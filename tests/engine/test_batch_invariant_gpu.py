"""Batch invariance on the GPU: with ``batch_invariant=True`` a request's tokens and logprobs are bit-identical
alone, in a batch, in sync or async mode, at any prefill budget and after a restart; the default mode's
divergences are counted and reported (a figure, not a failure).

``BATCHGEN_INVARIANCE_REPORT=<file>`` appends the default mode's counts there as JSON lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.model.kernels import kernels_available
from tiny_models import make_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not kernels_available(), reason="needs CUDA and Triton")]

SHAPES = {
    # multi-head attention, head_dim 64
    "llama-mha": ("llama", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=8192)),
    # grouped-query attention (4 query heads per KV head), q/k/v bias, tied embeddings
    "qwen2-gqa": ("qwen2", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                num_attention_heads=8, num_key_value_heads=2, vocab_size=8192)),
}  # fmt: skip
NUM_REQUESTS, MAX_NEW = 64, 40
RUNS = {
    "alone": dict(),
    "together-async": dict(),
    "together-sync": dict(mode="sync"),
    "budget-64": dict(max_batch_tokens=64),
    "budget-512": dict(max_batch_tokens=512),
    "restart": dict(),
}


@dataclass
class Result:
    tokens: list[int]
    logprobs: list[float]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(8, 400, (NUM_REQUESTS,), generator=g).tolist()
    return [torch.randint(3, 8192, (n,), generator=g).tolist() for n in lengths]


def _params(kind: str) -> list[SamplingParams]:
    if kind == "greedy":
        return [
            SamplingParams(temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True, logprobs=True)
        ] * NUM_REQUESTS
    return [
        SamplingParams(temperature=1.0, top_p=0.95, seed=1000 + i, max_new_tokens=MAX_NEW, ignore_eos=True, logprobs=True)
        for i in range(NUM_REQUESTS)
    ]  # fmt: skip


def _results(outputs) -> list[Result]:
    assert all(o.error is None for o in outputs), [o.error for o in outputs if o.error]
    return [Result(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]


def _run(shape: str, invariant: bool, run: str) -> dict[str, list[Result]]:
    arch, overrides = SHAPES[shape]
    llm = LLM(
        make_config(arch, initializer_range=0.02, **overrides),
        dtype="bfloat16",
        device="cuda",
        num_blocks=4096,
        block_size=16,
        max_num_seqs=NUM_REQUESTS,
        batch_invariant=invariant,
        **RUNS[run],
    )
    prompts, out = _prompts(), {}
    try:
        for kind in ("greedy", "seeded"):
            params = _params(kind)
            if run == "alone":
                out[kind] = [
                    _results(llm.generate([p], [sp]))[0] for p, sp in zip(prompts, params, strict=True)
                ]
            elif run == "restart":  # a fresh engine, the requests in another order
                rev = _results(llm.generate(prompts[::-1], params[::-1]))
                out[kind] = rev[::-1]
            else:
                out[kind] = _results(llm.generate(prompts, params))
    finally:
        llm.engine.close()
    for results in out.values():
        assert all(len(r.tokens) == MAX_NEW and len(r.logprobs) == MAX_NEW for r in results)
    return out


_cache: dict = {}


def _all_runs(shape: str, invariant: bool) -> dict[str, dict[str, list[Result]]]:
    key = (shape, invariant)
    if key not in _cache:
        _cache[key] = {run: _run(shape, invariant, run) for run in RUNS}
    return _cache[key]


def _diverging(runs: dict, run: str, kind: str) -> list[int]:
    alone, other = runs["alone"][kind], runs[run][kind]
    return [i for i, (a, b) in enumerate(zip(alone, other, strict=True)) if a != b]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_batch_invariant_mode_is_bit_identical_in_every_arrangement(shape):
    runs = _all_runs(shape, True)
    failures = {
        f"{run}/{kind}": _diverging(runs, run, kind)
        for run in RUNS
        if run != "alone"
        for kind in ("greedy", "seeded")
    }
    assert not any(failures.values()), (
        f"requests whose tokens or logprobs differ from their run alone: {failures}"
    )


@pytest.mark.parametrize("shape", list(SHAPES))
def test_default_mode_divergence_is_counted(shape):
    runs = _all_runs(shape, False)
    counts = {
        f"{run}/{kind}": len(_diverging(runs, run, kind))
        for run in RUNS
        if run != "alone"
        for kind in ("greedy", "seeded")
    }
    line = json.dumps({"shape": shape, "requests": NUM_REQUESTS, "diverging": counts})
    print(f"default mode, requests differing from their run alone: {line}")
    if os.environ.get("BATCHGEN_INVARIANCE_REPORT"):
        with open(os.environ["BATCHGEN_INVARIANCE_REPORT"], "a") as f:
            f.write(line + "\n")
    assert all(0 <= c <= NUM_REQUESTS for c in counts.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", [(384, 256), (8192, 256), (1000, 130)])
def test_linear_matches_torch_and_rows_do_not_depend_on_the_batch(dtype, n, k):
    from engine.model.batch_invariant import linear

    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(n, k, device="cuda", generator=g).to(dtype) / k**0.5
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    x = torch.randn(300, k, device="cuda", generator=g).to(dtype)
    full = linear(x, weight, bias)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(
        full.float(), F.linear(x.float(), weight.float(), bias.float()), atol=tol, rtol=tol
    )
    for rows in (1, 3, 17, 64, 65, 299):
        assert torch.equal(linear(x[:rows], weight, bias), full[:rows]), f"rows 0..{rows} differ"
    assert torch.equal(linear(x[120:121], weight, bias), full[120:121])
