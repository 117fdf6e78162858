"""What ``batch_invariant`` refuses, with a message that says why (its GPU behaviour: test_batch_invariant_gpu.py)."""

import pytest

from engine import LLM
from engine.config import EngineConfig
from tiny_models import make_config


def test_batch_invariant_on_cpu_is_refused_naming_the_gpu():
    with pytest.raises(ValueError, match="batch_invariant needs a CUDA GPU with Triton"):
        LLM(make_config("llama"), dtype="float32", device="cpu", num_blocks=64, batch_invariant=True)


def test_batch_invariant_refuses_a_family_whose_layers_are_not_fused():
    with pytest.raises(ValueError, match="model family 'gemma2' has 0 of 2 layers fused"):
        LLM(make_config("gemma2"), dtype="float32", device="cpu", num_blocks=64, batch_invariant=True)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(tensor_parallel_size=2), "tensor_parallel_size must be 1"),
        (dict(fused_sampler=False), "fused_sampler must be true"),
        (dict(fused_kernels=False), "needs fused_kernels=true"),
    ],
)
def test_batch_invariant_refuses_settings_it_cannot_keep_invariant(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(batch_invariant=True, **options)
