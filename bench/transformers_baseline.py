"""transformers' own continuous batching on the same model, for the benchmark's comparison.

What is timed on each side: the generation of the timed requests on a system already set up.

- transformers: one ``ContinuousBatchingManager`` per configuration (``model.init_continuous_batching``,
  with workload hints from the timed requests and ``max_requests_per_batch`` set to the comparison's
  concurrency), warmed up (``manager.warmup()``: the batch processor, its paged cache and, where
  enabled, CUDA graphs at the largest sizes), started, then run on untimed warm-up requests: as many
  as the timed ones, from the workload's other seed (so its prefix sharing holds none of the timed
  prompts), at most 16 new tokens each, so that the prefill batches the timed run meets have mostly
  been seen. The clock runs from the first timed ``add_request`` to the last timed result, each
  request with its own ``max_new_tokens``, EOS disabled. Not timed: the manager's creation, cache
  allocation, ``warmup()``, the warm-up requests, ``stop`` and ``destroy``. Timed: any CUDA graph it
  captures lazily for a batch size the warm-up did not reach (as it would in a second call on the
  same manager). ``generate_batch`` is not used: it builds and destroys a manager in every call (so
  the cache allocation, graph warm-up and ``destroy`` were timed) and takes one ``max_new_tokens``
  for all requests.
- our engine (``bench.workloads.run_engine``): from the first timed ``add_request`` to the end of
  the last step. Not timed: building the engine (KV cache allocation), CUDA graph capture, the
  warm-up on four untimed prompts, ``close``.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass

import torch

from engine.model.attention import ATTN_IMPLEMENTATION

# (label, ContinuousBatchingConfig fields) in the order tried; fields a version lacks are dropped.
CONFIGS = [
    ("transformers sync", {"use_async_batching": False, "use_cuda_graph": False}),
    ("transformers async", {"use_async_batching": True, "use_cuda_graph": False}),
    ("transformers sync + cuda graphs", {"use_async_batching": False, "use_cuda_graph": True}),
]

CPU_PAGE_SIZE = 256
"""ContinuousBatchingConfig's default page size (tokens per block), for sizing a CPU run's cache."""

RESOLVED = ("max_requests_per_batch", "num_blocks", "page_size", "max_batch_tokens")
"""Fields of the manager's resolved configuration written into a row's note (what it could hold)."""


@dataclass
class BaselineResult:
    label: str
    wall_s: float
    generated_tokens: int
    error: str | None = None
    settings: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s and not self.error else 0.0


def _known_fields(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls.__init__).parameters)


def _cb_config(fields: dict):
    from transformers import ContinuousBatchingConfig

    known = _known_fields(ContinuousBatchingConfig)
    kept = {k: v for k, v in fields.items() if k in known}
    return ContinuousBatchingConfig(**kept), kept


def _open_manager(model, gen, cb, requests: list[tuple[list[int], int]]):
    """A manager sized for ``requests`` (workload hints where this transformers version takes them)."""
    kwargs = dict(generation_config=gen, continuous_batching_config=cb)
    if "workload_hints" in inspect.signature(model.init_continuous_batching).parameters:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        kwargs["workload_hints"] = WorkloadHints(
            max_prompt_length=max(len(p) for p, _ in requests),
            max_generated_length=max(n for _, n in requests),
            num_requests=len(requests),
        )
    return model.init_continuous_batching(**kwargs)


def _drain(manager, ids: list[str]) -> dict:
    """Wait for the finished results of ``ids``; RuntimeError when the manager's loop dies first."""
    pending, results = set(ids), {}
    while pending:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f"transformers' generation loop stopped with {len(pending)} requests left")
            continue
        if result.is_finished() and result.request_id in pending:
            if getattr(result, "error", None):
                raise RuntimeError(f"request {result.request_id} failed: {result.error}")
            pending.discard(result.request_id)
            results[result.request_id] = result
    return results


def run_transformers(
    model,
    requests: list[tuple[list[int], int]],
    label: str,
    fields: dict,
    concurrency: int,
    warmup_requests: list[tuple[list[int], int]] = (),
) -> BaselineResult:
    """Time a warm manager on ``requests`` (prompt ids, new tokens each; EOS ignored), at most
    ``concurrency`` requests per batch; ``warmup_requests`` run untimed first."""
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=max(n for _, n in requests), do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    previous = model.config._attn_implementation
    manager = None
    try:
        fields = fields | {"max_requests_per_batch": concurrency}
        if model.device.type == "cpu" and "num_blocks" not in fields:
            # On the CPU it would size its cache by the host's free memory (gigabytes, for a tiny model): give it
            # blocks for ``concurrency`` requests of the longest length instead.
            longest = max(len(p) + n for p, n in requests)
            fields["num_blocks"] = concurrency * -(-longest // CPU_PAGE_SIZE) + 8
        cb, kept = _cb_config(fields)
        model.set_attn_implementation("sdpa")
        manager = _open_manager(model, gen, cb, requests)
        if hasattr(manager, "warmup"):
            manager.warmup()
        manager.start()
        warm = [
            manager.add_request(list(p), request_id=f"warmup-{i}", max_new_tokens=n)
            for i, (p, n) in enumerate(warmup_requests)
        ]
        _drain(manager, warm)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ids = [
            manager.add_request(list(p), request_id=f"timed-{i}", max_new_tokens=n)
            for i, (p, n) in enumerate(requests)
        ]
        results = _drain(manager, ids)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        tokens = sum(len(r.generated_tokens) for r in results.values())
        resolved = getattr(manager, "continuous_batching_config", None)
        held = {k: getattr(resolved, k) for k in RESOLVED if hasattr(resolved, k)}
        return BaselineResult(label, wall, tokens, settings=f"{kept}; resolved {held}")
    except Exception as exc:  # a baseline that fails on this machine is reported, not fatal
        return BaselineResult(label, 0.0, 0, error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        if manager is not None:
            try:
                if manager.is_running():
                    manager.stop(block=True, timeout=30)
                manager.destroy()
            except Exception:  # teardown of a failed manager: the row already says what went wrong
                pass
        model.set_attn_implementation(previous if previous else ATTN_IMPLEMENTATION)
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
