"""Lower bounds on a workload's wall time, with the rates they are charged at measured on the device.

``Roofline`` (what the benchmark reports): max(bytes that must move / copy bandwidth, FLOPs that must be
done / matmul rate), both rates measured in the same run (``measure_copy_bandwidth``,
``measure_matmul_rate``). ``Floor``: the earlier memory-bandwidth floor (the whole model read every
decode step, the input embedding table included), kept in ``benchmark.json`` for comparison with
older runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

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


# --- The roofline: bytes at the copy bandwidth, FLOPs at the matmul rate --------------------------------------


def measure_matmul_rate(
    device: torch.device,
    size: int | None = None,
    dtype: torch.dtype | None = None,
    repeats: int | None = None,
) -> tuple[float, str]:
    """Dense matmul rate in TFLOP/s of a ``size``-cube product, and a few words saying which.

    On CUDA an 8192 x 8192 x 8192 product in bf16 (the rate the roofline's FLOPs are charged at); on
    the CPU, where that would take seconds, a 1024-cube in float32 (the dtype the CPU benchmark runs in).
    """
    on_cuda = device.type == "cuda"
    size = size or (8192 if on_cuda else 1024)
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    repeats = repeats or (20 if on_cuda else 3)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    c = a @ b  # warm-up (kernel choice, allocation)
    if on_cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.matmul(a, b, out=c)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=c)
        seconds = time.perf_counter() - t
    dtype_name = str(dtype).removeprefix("torch.")
    return (
        2 * size**3 * repeats / seconds / 1e12,
        f"{dtype_name} {size}x{size}x{size} matmul on {device.type}",
    )


@dataclass(frozen=True)
class ModelCosts:
    """What one model (one rank's shard with tensor parallelism) costs per step and per token."""

    step_weight_bytes: int
    """Read whole every step: every parameter but the input embedding table; with tied embeddings the
    table counts once, as ``lm_head``."""
    embedding_bytes_per_token: int
    """One row of the (untied) input embedding table, read per processed token; 0 when tied."""
    kv_bytes_per_token: int
    body_params: int
    """Parameters a processed token is multiplied by: all but the input embedding table and ``lm_head``."""
    lm_head_params: int
    """``lm_head`` (the tied table too): multiplied only where a token is sampled, once per generated token."""
    attention_flops_per_context: int
    """4 x layers x heads x head_dim: a token's QK^T and PV over one context position, all layers."""


def model_costs(model, kv_split: int = 1) -> ModelCosts:
    """The counts of ``model`` (works on ``meta`` models); ``kv_split``: tensor-parallel ranks splitting the heads."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else embedding
    tied = head_weight is embedding
    total_bytes = weight_bytes(model)
    total_params = sum(p.numel() for p in model.parameters())
    emb_bytes = embedding.numel() * embedding.element_size()
    return ModelCosts(
        step_weight_bytes=total_bytes if tied else total_bytes - emb_bytes,
        embedding_bytes_per_token=0 if tied else embedding.shape[-1] * embedding.element_size(),
        kv_bytes_per_token=kv_bytes_per_token(model) // kv_split,
        body_params=total_params - embedding.numel() - (0 if tied else head_weight.numel()),
        lm_head_params=head_weight.numel(),
        attention_flops_per_context=4 * cfg.num_hidden_layers * heads * head_dim // kv_split,
    )


@dataclass(frozen=True)
class Roofline:
    """Lower bound on a workload's wall time: max(bytes / copy bandwidth, FLOPs / matmul rate).

    Bytes: the weights once per step (``steps`` is the fewest steps any schedule needs), the input
    embedding rows of every processed token, every generated token's context KV read once, the
    prompts' KV written once. FLOPs: 2 x body parameters per processed token, 2 x ``lm_head`` per
    generated token, and causal attention (each processed token over its context so far).
    """

    bandwidth_gbs: float
    matmul_tflops: float
    steps: int
    weight_bytes: int
    embedding_bytes: int
    kv_read_bytes: int
    kv_write_bytes: int
    linear_flops: int
    attention_flops: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.embedding_bytes + self.kv_read_bytes + self.kv_write_bytes

    @property
    def flops(self) -> int:
        return self.linear_flops + self.attention_flops

    @property
    def memory_s(self) -> float:
        return self.bytes / (self.bandwidth_gbs * 1e9)

    @property
    def compute_s(self) -> float:
        return self.flops / (self.matmul_tflops * 1e12)

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        """``bandwidth`` or ``compute``: which of the two times is the roofline."""
        return "compute" if self.compute_s > self.memory_s else "bandwidth"

    def to_dict(self) -> dict:
        return asdict(self) | dict(
            bytes=self.bytes,
            flops=self.flops,
            memory_s=self.memory_s,
            compute_s=self.compute_s,
            seconds=self.seconds,
            bound=self.bound,
        )


def workload_roofline(
    model,
    requests: list[tuple[list[int], int]],
    max_num_seqs: int,
    bandwidth_gbs: float,
    matmul_tflops: float,
    kv_split: int = 1,
) -> Roofline:
    """The roofline of ``requests`` (prompt ids, new tokens) with at most ``max_num_seqs`` sequences per step.

    A request of prompt length p and n new tokens runs p + n - 1 tokens through the model (the last
    generated token is sampled, never fed back); generated token i reads the KV of its p + i context
    tokens; the processed token at position j attends over j + 1 positions. With tensor parallelism,
    ``model`` is one rank's shard and ``kv_split`` the number of ranks: the roofline of one GPU.
    """
    costs = model_costs(model, kv_split)
    generated = sum(n for _, n in requests)
    steps = max(max(n for _, n in requests), -(-generated // max_num_seqs))
    processed = sum(len(p) + n - 1 for p, n in requests)
    context_reads = sum(n * len(p) + n * (n - 1) // 2 for p, n in requests)
    attended = sum((len(p) + n - 1) * (len(p) + n) // 2 for p, n in requests)
    return Roofline(
        bandwidth_gbs=bandwidth_gbs,
        matmul_tflops=matmul_tflops,
        steps=steps,
        weight_bytes=steps * costs.step_weight_bytes,
        embedding_bytes=processed * costs.embedding_bytes_per_token,
        kv_read_bytes=context_reads * costs.kv_bytes_per_token,
        kv_write_bytes=sum(len(p) for p, _ in requests) * costs.kv_bytes_per_token,
        linear_flops=2 * costs.body_params * processed + 2 * costs.lm_head_params * generated,
        attention_flops=costs.attention_flops_per_context * attended,
    )
