"""The memory-bandwidth floor of a decode workload: the bytes each step must read, at the measured copy rate."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Floor:
    """Lower bound on a workload's wall time: weights read once per decode step, each live token's KV once."""

    bandwidth_gbs: float
    weight_bytes: int
    kv_bytes_per_token: int
    decode_steps: int
    kv_bytes: int

    @property
    def seconds(self) -> float:
        return (self.decode_steps * self.weight_bytes + self.kv_bytes) / (self.bandwidth_gbs * 1e9)


def measure_copy_bandwidth(device: torch.device, size_mb: int = 1024, repeats: int = 10) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read and written (as the design's anchor does)."""
    n = size_mb * (1 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - t
    return 2 * src.numel() * 4 * repeats / seconds / 1e9


def kv_bytes_per_token(model) -> int:
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def weight_bytes(model) -> int:
    """Bytes of the model's parameters (works on ``meta`` models)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def workload_floor(
    model,
    requests: list[tuple[list[int], int]],
    max_num_seqs: int,
    bandwidth_gbs: float,
    kv_split: int = 1,
) -> Floor:
    """The floor for ``requests`` (prompt ids, new tokens) with at most ``max_num_seqs`` sequences per step.

    Schedule-independent: every generated token reads the KV of its whole context once, and a
    step serves at most ``max_num_seqs`` tokens, so there are at least that many weight reads.
    With tensor parallelism, ``model`` is one rank's shard (a ``meta`` model will do) and
    ``kv_split`` the number of ranks: the floor of one GPU, which reads its shard and KV heads.
    """
    weights = weight_bytes(model)
    per_token = kv_bytes_per_token(model) // kv_split
    generated = sum(n for _, n in requests)
    longest = max(n for _, n in requests)
    steps = max(longest, -(-generated // max_num_seqs))
    context_sum = sum(n * len(p) + n * (n - 1) // 2 for p, n in requests)
    return Floor(bandwidth_gbs, weights, per_token, steps, context_sum * per_token)
