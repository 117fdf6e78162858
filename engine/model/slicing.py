"""Megatron-style weight slicing of a transformers model for tensor parallelism.

Which module gets which split comes from the model's tensor-parallel plan
(``config.base_model_tp_plan``, e.g. Llama's ``layers.*.self_attn.q_proj: colwise``); the split
itself is done here, on a loaded model or on one on the ``meta`` device (whose slice
``tp_load`` then fills), so it does not depend on transformers' own TP machinery:

- ``colwise`` (q/k/v, gate/up): each rank keeps a contiguous slice of the output features (whole
  heads, a slice of the intermediate size) and of the bias.
- ``rowwise`` (o_proj, down_proj): each rank keeps the matching slice of the input features; the
  module becomes a :class:`RowParallelLinear`, whose partial outputs are summed by an all-reduce
  before the bias is added once.
- ``replicate*`` / ``keep_full_weight`` (q/k norms, which act per head): left whole.
- ``embedding_*`` on the input embeddings (some transformers versions ask for a vocab-parallel
  embedding when the embeddings are tied): left whole too.

Embeddings, the final norm and ``lm_head`` stay replicated: every rank computes the full logits
(identical on every rank, since all-reduce results are), so each can sample on its own. The
attention modules of the supported families shape their projections with ``view(..., -1,
head_dim)`` and the paged attention reads head counts off the tensors, so the local head counts
need no attribute changes (``num_key_value_groups`` keeps its ratio).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

_COLUMN = {"colwise"}
_ROW = {"rowwise"}
_REPLICATED = {"replicate", "replicated_with_grad_allreduce", "keep_full_weight"}
_EMBEDDING = {"embedding_rowwise", "embedding_colwise"}  # kept whole on the input embeddings


@dataclass(frozen=True)
class WeightSlice:
    """Which part of a full parameter a rank holds: ``full.narrow(dim, start, stop - start)``."""

    dim: int  # 0: column-parallel (output features), 1: row-parallel (input features)
    start: int
    stop: int
    full_shape: tuple[int, ...]

    def of(self, full: torch.Tensor) -> torch.Tensor:
        """This slice of ``full`` (a view)."""
        return full.narrow(self.dim, self.start, self.stop - self.start)


class RowParallelLinear(nn.Module):
    """A row-parallel slice of a Linear: ``all_reduce(x_local @ W_local^T) + bias``."""

    def __init__(self, linear: nn.Linear, rank: int, world_size: int, group) -> None:
        super().__init__()
        n = linear.in_features // world_size
        self.in_features, self.out_features = n, linear.out_features
        self.weight = nn.Parameter(linear.weight[:, rank * n : (rank + 1) * n].clone(), requires_grad=False)
        self.register_parameter("bias", linear.bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        self.group.allreduce([y], dist.ReduceOp.SUM).wait()
        return y if self.bias is None else y + self.bias


def tp_plan(config: PretrainedConfig) -> dict[str, str]:
    """The model's tensor-parallel plan (module pattern -> style); ValueError if it has none or an unsupported style."""
    text = config.get_text_config()
    plan = dict(getattr(text, "base_model_tp_plan", None) or {})
    if not plan:
        raise ValueError(
            f"tensor parallelism needs the model's tensor-parallel plan, and {type(text).__name__} "
            f"(model_type {getattr(text, 'model_type', '?')!r}) has none"
        )
    unsupported = {
        k: v
        for k, v in plan.items()
        if v not in _COLUMN | _ROW | _REPLICATED and not (v in _EMBEDDING and "." not in k)
    }
    if unsupported:
        raise ValueError(
            f"tensor parallelism supports the colwise / rowwise / replicated splits; {type(text).__name__}'s "
            f"plan also asks for {unsupported}"
        )
    return plan


def check_tp_support(config: PretrainedConfig, world_size: int) -> None:
    """ValueError naming the numbers if ``config``'s model cannot be split over ``world_size`` ranks."""
    if world_size == 1:
        return
    tp_plan(config)
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    inter = getattr(text, "intermediate_size", None)
    problems = []
    if heads % world_size:
        problems.append(f"num_attention_heads {heads} is not divisible by {world_size}")
    if kv_heads % world_size:
        problems.append(f"num_key_value_heads {kv_heads} is not divisible by {world_size}")
    if inter is not None and inter % world_size:
        problems.append(f"intermediate_size {inter} is not divisible by {world_size}")
    if problems:
        raise ValueError(f"tensor_parallel_size={world_size} cannot split this model: " + "; ".join(problems))


def _pattern(key: str) -> re.Pattern:
    return re.compile(re.escape(key).replace(r"\*", r"\d+"))


def slice_model(model: PreTrainedModel, rank: int, world_size: int, group) -> dict[str, WeightSlice]:
    """Replace the planned Linear weights of ``model`` by rank ``rank``'s slice, in place.

    Works on a model on the ``meta`` device too (only shapes change). Returns the slice each split
    parameter holds, by its name in ``model.named_parameters()``; parameters not named are whole.
    """
    check_tp_support(model.config, world_size)
    plan = tp_plan(model.config)
    base = model.base_model
    modules = dict(base.named_modules())
    prefix = next(n for n, m in model.named_modules() if m is base)
    prefix = f"{prefix}." if prefix else ""
    slices: dict[str, WeightSlice] = {}
    for key, style in plan.items():
        if style in _REPLICATED:
            continue
        pattern = _pattern(key)
        names = [n for n in modules if pattern.fullmatch(n)]
        if not names:
            raise ValueError(f"the tensor-parallel plan's {key!r} matches no module of {type(base).__name__}")
        if style in _EMBEDDING:
            if any(modules[n] is not model.get_input_embeddings() for n in names):
                raise ValueError(f"tensor parallelism keeps only the input embeddings whole, not {key!r}")
            continue
        for name in names:
            linear = modules[name]
            if type(linear) is not nn.Linear:
                raise ValueError(
                    f"tensor parallelism splits nn.Linear only; {name} is {type(linear).__name__}"
                )
            parent_name, _, attr = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            full = tuple(linear.weight.shape)
            if style in _COLUMN:
                n = _split_columns(linear, rank, world_size, name)
                part = (rank * n, (rank + 1) * n)
                slices[f"{prefix}{name}.weight"] = WeightSlice(0, *part, full)
                if linear.bias is not None:
                    slices[f"{prefix}{name}.bias"] = WeightSlice(0, *part, (full[0],))
            else:
                if linear.in_features % world_size:
                    raise ValueError(
                        f"{name}: in_features {linear.in_features} is not divisible by {world_size}"
                    )
                n = linear.in_features // world_size
                setattr(parent, attr, RowParallelLinear(linear, rank, world_size, group))
                slices[f"{prefix}{name}.weight"] = WeightSlice(1, rank * n, (rank + 1) * n, full)
    return slices


def _split_columns(linear: nn.Linear, rank: int, world_size: int, name: str) -> int:
    """Keep rank ``rank``'s slice of the output features; returns its size."""
    if linear.out_features % world_size:
        raise ValueError(f"{name}: out_features {linear.out_features} is not divisible by {world_size}")
    n = linear.out_features // world_size
    part = slice(rank * n, (rank + 1) * n)
    linear.weight = nn.Parameter(linear.weight[part].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[part].clone(), requires_grad=False)
    linear.out_features = n
    return n
