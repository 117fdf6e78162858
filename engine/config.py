"""Engine and model configuration (plain dataclasses: the engine knows nothing of Hydra)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Where the model and tokenizer come from and how to load them."""

    model: str = ""
    tokenizer: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass
class EngineConfig:
    """Scheduling, cache and execution settings.

    The KV cache takes ``gpu_memory_utilization`` of the GPU's memory (minus what is in use
    after loading the model) on CUDA, ``cpu_kv_cache_gb`` on CPU, unless ``num_blocks`` is set.
    """

    block_size: int = 16
    max_batch_tokens: int = 2048
    max_num_seqs: int = 256
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_gb: float = 0.25
    """CPU runs are for tiny models and tests: a quarter GiB holds thousands of their tokens."""
    enable_prefix_caching: bool = True
    mode: str = "auto"
    cuda_graphs: bool = True
    fused_sampler: bool = True
    """Sample with the fused Triton kernel on CUDA (no sort of the vocabulary; the same tokens as the
    PyTorch sampler for the same seeds); False keeps the PyTorch (sorting) sampler."""
    fused_kernels: bool = True
    """Fuse the decoder layers of Llama-family models (RMSNorm, rotary + cache write, q/k/v and gate/up matmuls)."""
    max_top_logprobs: int = 20
    """Most alternatives ``SamplingParams.top_logprobs`` may ask per generated token: the width of the
    top-k outputs of every step that has a row asking (a fixed width keeps CUDA graphs and copies
    shape-stable). A job raises it to its own ``sampling.top_logprobs``."""
    batch_invariant: bool = False
    """On CUDA, make each row's logits independent of the other rows of its step (a fixed-order Triton
    matmul, attention without key splits; ``engine.model.batch_invariant``): a request then gives the
    same tokens and logprobs alone or in any batch, chunking or restart. Slower; Llama-family models only."""
    seed: int = 0
    device: str = "auto"
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.block_size < 1:
            problems.append(f"block_size must be >= 1, got {self.block_size}")
        if self.max_batch_tokens < 1:
            problems.append(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.max_num_seqs < 1:
            problems.append(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_top_logprobs < 0:
            problems.append(f"max_top_logprobs must be >= 0, got {self.max_top_logprobs}")
        if self.num_blocks is not None and self.num_blocks < 1:
            problems.append(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gb <= 0:
            problems.append(f"cpu_kv_cache_gb must be > 0, got {self.cpu_kv_cache_gb}")
        if self.mode not in ("auto", "sync", "async"):
            problems.append(f"mode must be one of auto, sync, async, got {self.mode!r}")
        if self.tensor_parallel_size < 1:
            problems.append(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        elif self.tensor_parallel_size > 1 and self.device not in ("auto", "cuda", "cpu"):
            problems.append(
                f"tensor_parallel_size > 1 places rank r on GPU r: device must be auto, cuda or cpu, got {self.device!r}"
            )
        if self.batch_invariant and self.tensor_parallel_size > 1:
            problems.append("batch_invariant runs on one GPU: tensor_parallel_size must be 1")
        if self.batch_invariant and not self.fused_sampler:
            problems.append("batch_invariant samples with the fused sampler: fused_sampler must be true")
        if self.batch_invariant and not self.fused_kernels:
            problems.append("batch_invariant needs fused_kernels=true (it covers the fused decoder layers)")
        if problems:
            raise ValueError("invalid EngineConfig: " + "; ".join(problems))
