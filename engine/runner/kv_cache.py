"""Size and allocate the paged KV cache: one key and one value tensor per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.model.loader import ModelShape


@dataclass(frozen=True)
class CacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


def activation_reserve_bytes(
    shape: ModelShape, hidden_size: int, intermediate_size: int, cfg: EngineConfig
) -> int:
    """A generous bound on one step's activations: a few hidden-sized and MLP-sized buffers per token, plus logits."""
    per_token = 4 * (6 * hidden_size + 3 * intermediate_size)
    logits = 4 * 4 * cfg.max_num_seqs * shape.vocab_size
    return cfg.max_batch_tokens * per_token + logits + (256 << 20)


def num_blocks_for(spec: CacheSpec, cfg: EngineConfig, device: torch.device, reserve: int) -> int:
    """Blocks that fit: ``num_blocks`` if set, else a fraction of free GPU memory, else the CPU budget."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1.0 - cfg.gpu_memory_utilization) * total - reserve
    else:
        budget = cfg.cpu_kv_cache_gb * (1 << 30)
    blocks = int(budget // spec.bytes_per_block)
    if blocks < 2:
        where = "gpu_memory_utilization" if device.type == "cuda" else "cpu_kv_cache_gb"
        raise RuntimeError(
            f"no memory left for the KV cache ({budget / 2**30:.2f} GiB): raise {where}, "
            "lower max_batch_tokens / max_num_seqs, or use a smaller model or dtype"
        )
    return blocks


def allocate_kv_cache(
    spec: CacheSpec, num_blocks: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [
        (
            torch.zeros(shape, dtype=spec.dtype, device=device),
            torch.zeros(shape, dtype=spec.dtype, device=device),
        )
        for _ in range(spec.num_layers)
    ]
