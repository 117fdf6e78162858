"""The per-device half of the engine: fuse the model, size and allocate its KV cache, build its model
runner and capture its CUDA graphs.

A single-GPU engine has one worker; with tensor parallelism every rank has one (rank 0's loop
drives its own, and each follower's loop feeds its worker the steps rank 0 sends). A worker knows
nothing of requests or scheduling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from engine.config import EngineConfig
from engine.model.attention import UnsupportedAttentionError
from engine.model.batch_invariant import check_supported
from engine.model.fusion import fuse_model
from engine.model.kernels import kernels_available
from engine.model.loader import model_shape
from engine.runner.kv_cache import CacheSpec, activation_reserve_bytes, allocate_kv_cache, num_blocks_for
from engine.runner.model_runner import ModelRunner


def _allocate_or_explain(spec: CacheSpec, num_blocks: int, device: torch.device):
    try:
        return allocate_kv_cache(spec, num_blocks, device)
    except torch.OutOfMemoryError as exc:
        gib = num_blocks * spec.bytes_per_block / 2**30
        raise RuntimeError(
            f"out of memory allocating the KV cache ({num_blocks} blocks, {gib:.1f} GiB): lower "
            "gpu_memory_utilization or num_blocks (or cpu_kv_cache_gb on CPU), or max_batch_tokens / max_num_seqs"
        ) from exc


class Worker:
    """One device's model, KV cache and model runner.

    ``kv_head_groups``: the KV heads are split this many ways (tensor parallelism: a rank caches
    its own). ``agree_num_blocks`` turns this device's KV block count into the one all ranks use.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: EngineConfig,
        *,
        kv_head_groups: int = 1,
        agree_num_blocks: Callable[[int], int] | None = None,
    ) -> None:
        self.model, self.config = model, config
        self.device = next(model.parameters()).device
        self.fused_layers = fuse_model(model) if config.fused_kernels else 0
        use_kernels = self.device.type == "cuda" and kernels_available()
        if config.batch_invariant:
            check_supported(model, self.fused_layers, use_kernels)
        shape = model_shape(model)
        self.vocab_size, self.max_model_len = shape.vocab_size, shape.max_model_len
        text_cfg = model.config.get_text_config()
        spec = CacheSpec(
            shape.num_layers,
            shape.num_kv_heads // kv_head_groups,
            shape.head_dim,
            config.block_size,
            model.dtype,
        )
        reserve = activation_reserve_bytes(
            shape,
            text_cfg.hidden_size,
            getattr(text_cfg, "intermediate_size", 4 * text_cfg.hidden_size),
            config,
        )
        num_blocks = num_blocks_for(spec, config, self.device, reserve)
        self.num_blocks = agree_num_blocks(num_blocks) if agree_num_blocks else num_blocks
        self.runner = ModelRunner(
            model,
            _allocate_or_explain(spec, self.num_blocks, self.device),
            max_tokens=config.max_batch_tokens,
            max_seqs=config.max_num_seqs,
            max_blocks_per_seq=-(-self.max_model_len // config.block_size),
            use_kernels=use_kernels,
            cuda_graphs=config.cuda_graphs,
            fused_sampler=config.fused_sampler,
            top_width=min(config.max_top_logprobs, shape.vocab_size),
            batch_invariant=config.batch_invariant,
        )
        self.tp: Any = None
        """Rank 0 of a tensor-parallel group: its ``engine.parallel.group.TPContext``."""
        try:
            self.runner.probe()
        except UnsupportedAttentionError as exc:
            family = getattr(model.config, "model_type", type(model).__name__)
            raise UnsupportedAttentionError(f"model family {family!r} is not supported: {exc}") from exc
        self.close_hooks: list[Callable[[], None]] = []
        """Run first by ``close`` (rank 0 of a tensor-parallel group stops the followers there)."""
        started = time.perf_counter()
        if self.runner.use_graphs:
            try:
                self.runner.capture_graphs()
            except torch.OutOfMemoryError as exc:
                raise RuntimeError(
                    "out of memory capturing CUDA graphs: lower gpu_memory_utilization or max_batch_tokens, "
                    "or set cuda_graphs=false"
                ) from exc
        self.graph_capture_s = time.perf_counter() - started

    def close(self) -> None:
        """Free the cache and the CUDA graphs (the GPU memory returns to the allocator), once the
        device has finished every launched step."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for hook in self.close_hooks:
            hook()
        self.close_hooks = []
        self.runner.release_graphs()
        self.runner.kv_caches.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
