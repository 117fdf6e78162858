"""What each tensor-parallel rank builds its slice of the model from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from engine.config import ModelConfig
from engine.model.lean_load import lean_slice
from engine.model.loader import build_random_model, load_model, prepare_model, resolve_dtype
from engine.model.slicing import slice_model
from engine.parallel.group import TPContext


@dataclass
class ModelSource:
    """A checkpoint, a config (random weights from ``seed``), a config with a state dict (a model
    object's weights, for spawned ranks), or the model object itself (rank 0 and torchrun ranks,
    sliced in place)."""

    model_cfg: ModelConfig | None = None
    config: PretrainedConfig | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    model: PreTrainedModel | None = None
    dtype: Any = "auto"
    seed: int = 0

    def resolve_config(self) -> PretrainedConfig:
        if self.config is None:
            if self.model is not None:
                self.config = self.model.config
            else:
                assert self.model_cfg is not None
                m = self.model_cfg
                self.config = AutoConfig.from_pretrained(
                    m.model, revision=m.revision, trust_remote_code=m.trust_remote_code
                )
        return self.config

    def for_followers(self) -> ModelSource:
        """A picklable copy: a model object travels as its config and (CPU, shared-memory) weights."""
        if self.model is None:
            return self
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return ModelSource(config=self.model.config, state_dict=weights, dtype=self.model.dtype)

    def build(self, ctx: TPContext) -> PreTrainedModel:
        """This rank's slice of the model, on its device.

        A config and a local folder of safetensors files are built lean (``lean_load.lean_slice``:
        on ``meta``, sliced there, then only this rank's slices made or read on its device).
        Other checkpoints (``.bin`` files, hub ids) and configs of families whose init ``lean_load``
        does not know are loaded whole (checkpoints on CPU) and sliced; so is a model object.
        """
        if self.model is None and self.state_dict is None:
            m, config = self.model_cfg, self.resolve_config()
            dtype = resolve_dtype(m.dtype if m else self.dtype, config, ctx.device)
            path, remote = (m.model, m.trust_remote_code) if m else (None, False)
            model = lean_slice(
                config, dtype, ctx.device, ctx.rank, ctx.world_size, ctx.group, self.seed, path, remote
            )
            if model is not None:
                return prepare_model(model, ctx.device)
        cpu = torch.device("cpu")
        if self.model is not None:
            model = self.model
        elif self.model_cfg is not None:
            dtype = resolve_dtype(self.model_cfg.dtype, self.resolve_config(), ctx.device)
            model = load_model(dataclasses.replace(self.model_cfg, dtype=dtype), cpu)
        elif self.state_dict is not None:
            assert self.config is not None
            model = build_random_model(self.config, self.dtype, cpu, self.seed)
            model.load_state_dict(self.state_dict)
        else:
            assert self.config is not None
            model = build_random_model(self.config, self.dtype, ctx.device, self.seed)
        slice_model(model, ctx.rank, ctx.world_size, ctx.group)
        return prepare_model(model, ctx.device)
