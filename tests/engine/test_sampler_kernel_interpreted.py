"""The fused sampler's logic on CPU, under Triton's interpreter: the same tokens as the reference sampler.

The kernels run on CUDA in production (``test_sampler_kernel_gpu.py`` checks them there); here
Triton's interpreter runs the same code on CPU tensors, so that the split passes, the radix select
through tied values, the rounds and the token masks are checked on every run of the suite. The
interpreter must be switched on before Triton is imported, so the check runs in a child process
(this file, run as a script).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

VOCAB = 40_000  # three chunks of the split passes
ROWS = 10


def logits_and_tensors(kind: str, g: torch.Generator):
    from engine.runner.sampler import SamplingTensors

    if kind == "ties":  # values on a coarse grid: every top-k boundary cuts through tied tokens
        x = (torch.randn(ROWS, VOCAB, generator=g) * 2).round() / 2
    else:
        x = torch.randn(ROWS, VOCAB, generator=g) * torch.tensor([0.5, 1.0, 2.0, 4.0, 1.0] * 2)[:, None]
        x.scatter_add_(1, torch.randint(0, VOCAB, (ROWS, 3), generator=g), torch.full((ROWS, 3), 9.0))
    top_k = (
        torch.tensor([0, 1, 5, 50, 1000, 0, 7, 20, 0, 333]) if kind != "top_p" else torch.zeros(ROWS).long()
    )
    top_p = torch.tensor([0.3, 0.8, 0.9, 0.95, 1.0, 0.99, 0.9, 1.0, 0.5, 0.9])
    min_p = (
        torch.tensor([0.0, 0.0, 0.05, 0.0, 0.1, 0.0, 0.0, 0.2, 0.0, 0.0])
        if kind == "all"
        else torch.zeros(ROWS)
    )
    temperature = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.0, 1.0, 2.0, 1.0, 1.0, 0.9])
    suppress = torch.full((ROWS, 16), -1, dtype=torch.int64)
    if kind == "all":
        suppress[::2, :4] = x[::2].topk(4).indices  # forbid the likeliest tokens of every other row
        suppress[::2, 4:] = suppress[::2, :1]
    sampling = temperature > 0
    st = SamplingTensors(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=torch.randint(0, 2**62, (ROWS,), generator=g),
        position=torch.randint(0, 10_000, (ROWS,), generator=g),
        suppress=suppress,
        any_sampling=bool(sampling.any()),
        any_top_k_top_p=bool((sampling & ((top_k > 0) | (top_p < 1))).any()),
        any_min_p=bool((sampling & (min_p > 0)).any()),
    )
    return x, st


def random_mask(g: torch.Generator):
    from engine.runner.sampler import TokenMask

    rows = torch.tensor([0, 3, 4, 7, 9])
    allowed = torch.rand(len(rows), VOCAB, generator=g) < torch.tensor([0.01, 0.3, 0.01, 0.5, 0.3])[:, None]
    allowed[:, :3] = True
    bits = torch.nn.functional.pad(allowed, (0, -VOCAB % 32)).view(len(rows), -1, 32).long()
    words = (bits << torch.arange(32)).sum(-1)
    return TokenMask(rows, torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))


def check() -> None:
    from engine.runner.sampler import sample
    from engine.runner.sampler_kernel import sample_fused

    g = torch.Generator().manual_seed(0)
    for kind, masked in (("top_p", True), ("ties", False), ("ties", True), ("all", True)):
        x, st = logits_and_tensors(kind, g)
        mask = random_mask(g) if masked else None
        ref_t, ref_lp = sample(x, st, True, mask=mask)
        ker_t, ker_lp = sample_fused(x, st, True, mask=mask)
        assert torch.equal(ker_t, ref_t), f"{kind} masked={masked}: {ref_t.tolist()} != {ker_t.tolist()}"
        torch.testing.assert_close(ker_lp, ref_lp, rtol=1e-5, atol=1e-5)
    print("sampler kernel == reference")


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs Triton (the guided extra brings it)"
)
def test_fused_sampler_equals_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "sampler kernel == reference" in done.stdout


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    check()
