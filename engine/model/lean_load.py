"""Lean model construction: build on ``meta``, slice on ``meta``, then materialise only this rank's slice.

No rank ever holds the whole model, on its device or in host memory:

- **Random weights** (:func:`random_slice`): every parameter is drawn whole, one at a time, on the
  rank's device from a generator seeded with (seed, parameter name), then this rank's slice is
  kept and the full tensor freed. Peak memory: the slice plus one full parameter. The weights are
  the same for any tensor-parallel size (and for one process: ``build_random_model(...,
  init="per_parameter")``), given the device type and dtype. Each parameter is initialised as
  transformers' ``_init_weights`` does for the families whose init is known here (Linear and
  Embedding weights normal(0, ``initializer_range``) with the padding row zeroed, biases zero,
  RMSNorm weights one, or zero for Gemma 1/2/3, whose norms store weight - 1); any other family is
  refused with a ValueError rather than guessed.
- **Checkpoints** (:func:`checkpoint_slice`): a local folder of safetensors files
  (``model.safetensors`` or several files with ``model.safetensors.index.json``); each parameter's
  slice is read with ``safe_open(...).get_slice(name)[...]`` (the files are memory-mapped: only
  the pages a slice touches are read, into the page cache the ranks share) and copied to the device.

Non-persistent buffers (rotary ``inv_freq``, Gemma's ``embed_scale``) are recomputed on the device
by the model's own ``_init_weights`` for the module that owns them; a buffer it leaves unset is an
error. Tied parameters (``lm_head.weight`` and ``embed_tokens.weight``) stay one tensor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from engine.model.attention import ATTN_IMPLEMENTATION
from engine.model.errors import ModelLoadError
from engine.model.slicing import WeightSlice, slice_model

_GEMMA_INIT = {"GemmaPreTrainedModel", "Gemma2PreTrainedModel", "Gemma3PreTrainedModel"}
"""Families whose ``_init_weights`` is the base one plus zeroed RMSNorm weights (and buffers)."""

Fill = Callable[[str, nn.Parameter, "WeightSlice | None"], torch.Tensor]


@dataclass(frozen=True)
class InitRule:
    """How transformers initialises one parameter: ``normal`` (std, optional zero row) or a constant."""

    kind: str  # "normal" | "constant"
    value: float = 0.0  # the std of normal, or the constant
    zero_row: int | None = None  # an Embedding's padding_idx


def build_meta_model(
    config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The model of ``config`` on the ``meta`` device: shapes and dtypes, no storage."""
    config = copy.deepcopy(config)  # the model keeps its config: never share it with other models
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, trust_remote_code=trust_remote_code
        )


def lean_init_supported(model: PreTrainedModel) -> bool:
    """Whether :func:`init_rules` knows the init of ``model``'s family."""
    fn = type(model)._init_weights
    return fn is PreTrainedModel._init_weights or fn.__qualname__.split(".")[0] in _GEMMA_INIT


def init_rules(model: PreTrainedModel) -> dict[str, InitRule]:
    """transformers' init of each parameter of ``model`` (by its first name); ValueError if unknown."""
    if not lean_init_supported(model):
        raise ValueError(
            f"per-parameter random init knows transformers' init of Llama, Mistral, Qwen2/3 and Gemma 1/2/3 "
            f"(the base _init_weights, or Gemma's); {type(model).__name__} has its own "
            f"({type(model)._init_weights.__qualname__}): build it with init='module' (transformers' own init)"
        )
    norm = 1.0 if type(model)._init_weights is PreTrainedModel._init_weights else 0.0
    std = _init_std(model.config)
    rules: dict[str, InitRule] = {}
    for module_name, module in model.named_modules():
        cls = type(module).__name__
        for attr, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{attr}" if module_name else attr
            if isinstance(module, nn.Linear) and attr in ("weight", "bias"):
                rule = InitRule("normal", std) if attr == "weight" else InitRule("constant", 0.0)
            elif isinstance(module, nn.Embedding) and attr == "weight":
                rule = InitRule("normal", std, module.padding_idx)
            elif ("RMSNorm" in cls or "LayerNorm" in cls) and attr in ("weight", "bias"):
                rule = InitRule("constant", norm if attr == "weight" else 0.0)
            else:
                raise ValueError(f"per-parameter random init does not know how to initialise {name} ({cls})")
            rules.setdefault(name, rule)
    return rules


def param_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name``."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_slice(
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    group=None,
) -> PreTrainedModel:
    """Rank ``rank``'s slice of a randomly initialised model, built without ever holding the whole model."""
    model = build_meta_model(config, dtype)
    rules = init_rules(model)
    slices = slice_model(model, rank, world_size, group) if world_size > 1 else {}

    def fill(name: str, meta: nn.Parameter, part: WeightSlice | None) -> torch.Tensor:
        rule = rules[name]
        if rule.kind == "constant":
            return torch.full(meta.shape, rule.value, dtype=meta.dtype, device=device)
        generator = torch.Generator(device=device)
        generator.manual_seed(param_seed(seed, name))
        full = torch.empty(part.full_shape if part else meta.shape, dtype=meta.dtype, device=device)
        full.normal_(0.0, rule.value, generator=generator)
        if rule.zero_row is not None:
            full[rule.zero_row] = 0
        return full if part is None else part.of(full).clone(memory_format=torch.contiguous_format)

    _materialise(model, device, fill, slices)
    return model


def safetensors_files(directory: str | Path) -> dict[str, Path] | None:
    """Checkpoint key -> file of a local folder of safetensors weights, or None if it is not one."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: directory / f for k, f in weight_map.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def checkpoint_slice(
    directory: str | Path,
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    group=None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Rank ``rank``'s slice of the safetensors checkpoint in ``directory``, read slice by slice.

    ModelLoadError naming them if a checkpoint key matches no parameter of the model, a parameter
    is missing from the checkpoint, or a shape differs.
    """
    from safetensors import safe_open

    files = safetensors_files(directory)
    if files is None:
        raise ModelLoadError(f"{directory} holds no model.safetensors or model.safetensors.index.json")
    model = build_meta_model(config, dtype, trust_remote_code)
    aliases = _parameter_aliases(model)
    _check_keys(model, set(files), aliases)
    slices = slice_model(model, rank, world_size, group) if world_size > 1 else {}
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def fill(name: str, meta: nn.Parameter, part: WeightSlice | None) -> torch.Tensor:
            key = next(k for k in aliases[name] if k in files)
            path = files[key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt"))
            stored = handles[path].get_slice(key)
            shape = tuple(stored.get_shape())
            expected = part.full_shape if part else tuple(meta.shape)
            if shape != expected:
                raise ModelLoadError(f"{path.name}: {key} has shape {shape}; the model expects {expected}")
            if part is None:
                tensor = stored[:] if shape else handles[path].get_tensor(key)
            else:
                index = (slice(None),) * part.dim + (slice(part.start, part.stop),)
                tensor = stored[index]
            # A copy: the slice may be a view of the file's memory map (safetensors' get_slice).
            return torch.empty(tensor.shape, dtype=meta.dtype, device=device).copy_(tensor)

        _materialise(model, device, fill, slices)
    generation = Path(directory) / "generation_config.json"
    if generation.is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def lean_slice(
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    group=None,
    seed: int = 0,
    checkpoint: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel | None:
    """Rank ``rank``'s slice built lean: read from ``checkpoint`` if given, else random from ``seed``.

    None when it cannot be: ``checkpoint`` is not a local folder of safetensors files (a hub id,
    ``.bin`` files), or ``config``'s family has an init :func:`init_rules` does not know.
    """
    if checkpoint is not None:
        if not Path(checkpoint).is_dir() or safetensors_files(checkpoint) is None:
            return None
        return checkpoint_slice(
            checkpoint, config, dtype, device, rank, world_size, group, trust_remote_code=trust_remote_code
        )
    if not lean_init_supported(build_meta_model(config, dtype)):
        return None
    return random_slice(config, dtype, device, seed, rank, world_size, group)


def _init_std(config: PretrainedConfig) -> float:
    """The std of transformers' base ``_init_weights``."""
    if hasattr(config, "initializer_range"):
        return config.initializer_range or 0.02
    if hasattr(config, "init_std"):
        return config.init_std
    if hasattr(config, "initializer_factor"):
        return config.initializer_factor
    return getattr(config.get_text_config(), "initializer_range", 0.02)


def _parameter_aliases(model: PreTrainedModel) -> dict[str, list[str]]:
    """Each parameter's first name -> all its names (a tied parameter has several)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names for names in by_id.values()}


def _check_keys(model: PreTrainedModel, keys: set[str], aliases: dict[str, list[str]]) -> None:
    known = {n for names in aliases.values() for n in names}
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = sorted(k for k in keys - known if not any(p.search(k) for p in ignore))
    persistent = set(model.state_dict()) - known
    if persistent:
        raise ModelLoadError(
            f"{type(model).__name__} has persistent buffers ({', '.join(sorted(persistent))}), which the "
            "per-slice loader does not read"
        )
    missing = sorted(first for first, names in aliases.items() if not any(n in keys for n in names))
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"not parameters of {type(model).__name__}: {', '.join(unexpected[:20])}")
    if problems:
        raise ModelLoadError("the checkpoint does not match the model: " + "; ".join(problems))


def _materialise(
    model: PreTrainedModel, device: torch.device, fill: Fill, slices: dict[str, WeightSlice]
) -> None:
    """Give every parameter of the meta ``model`` its values from ``fill`` (one parameter at a time,
    tied ones once) and recompute its buffers, all on ``device``."""
    _recompute_buffers(model, device)
    aliases = _parameter_aliases(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for first, names in aliases.items():
        meta = params[first]
        value = nn.Parameter(fill(first, meta, slices.get(first)), requires_grad=False)
        if tuple(value.shape) != tuple(meta.shape):
            raise RuntimeError(f"{first}: built {tuple(value.shape)}, the slice is {tuple(meta.shape)}")
        for name in names:
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name)._parameters[attr] = value
    left = [
        f"{module_name}.{attr}"
        for module_name, module in model.named_modules()
        for attr, value in vars(module).items()
        if isinstance(value, torch.Tensor) and value.is_meta
    ]
    left += [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after building the model: {', '.join(left)}")
    if device.type == "cuda":  # the freed full parameters: free memory for the KV cache, which counts it
        torch.cuda.empty_cache()


def _recompute_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Recompute every buffer on ``device`` with the model's ``_init_weights`` of the module that owns it
    (run while the parameters are still on ``meta``, where its parameter init does nothing)."""
    for module_name, module in model.named_modules():
        own = [(n, b) for n, b in module._buffers.items() if b is not None]
        if not own:
            continue
        for attr, buf in own:
            if not buf.is_floating_point():
                raise ValueError(f"cannot recompute the non-float buffer {module_name}.{attr}")
            module._buffers[attr] = torch.full(buf.shape, float("nan"), dtype=buf.dtype, device=device)
        with torch.no_grad():
            model._init_weights(module)
        unset = [a for a, _ in own if torch.isnan(module._buffers[a]).any()]
        if unset:
            raise ValueError(
                f"{type(model).__name__}._init_weights does not recompute the buffer(s) "
                f"{', '.join(f'{module_name}.{a}' for a in unset)} ({type(module).__name__})"
            )
