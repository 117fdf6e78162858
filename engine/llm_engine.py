"""The streaming engine: add requests, step, collect samples as they finish."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .block_manager import BlockManager
from .config import EngineConfig, ModelConfig
from .detokenizer import Detokenizer, find_stop
from .fusion import fuse_model
from .kernels import kernels_available
from .kv_cache import CacheSpec, activation_reserve_bytes, allocate_kv_cache, num_blocks_for
from .model_loader import eos_token_ids, load_model, load_tokenizer, model_shape, resolve_device
from .model_runner import Launched, ModelRunner
from .outputs import CompletionOutput, RequestError
from .prompts import PromptType, tokenize_prompt
from .sampler import INVALID_TOKEN
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import SeqStatus, Sequence
from .step_inputs import MAX_SUPPRESS, build_step_arrays
from .timing import RunSummary, StepRecord, StepTotals

if TYPE_CHECKING:
    from .tensor_parallel import TPContext


def derive_seed(base: int, key: str, sample_index: int) -> int:
    digest = hashlib.blake2b(f"{base}/{key}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def _allocate_or_explain(spec: CacheSpec, num_blocks: int, device: torch.device):
    try:
        return allocate_kv_cache(spec, num_blocks, device)
    except torch.OutOfMemoryError as exc:
        gib = num_blocks * spec.bytes_per_block / 2**30
        raise RuntimeError(
            f"out of memory allocating the KV cache ({num_blocks} blocks, {gib:.1f} GiB): lower "
            "gpu_memory_utilization or num_blocks (or cpu_kv_cache_gb on CPU), or max_batch_tokens / max_num_seqs"
        ) from exc


@dataclass
class _InFlight:
    batch: ScheduledBatch
    launched: Launched
    wall_start: float
    prep_s: float


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine's load."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int


class LLMEngine:
    """Continuous-batching generation over a transformers model with a paged KV cache."""

    def __init__(
        self, model, tokenizer=None, config: EngineConfig | None = None, tp: TPContext | None = None
    ):
        """``tp``: this rank's tensor-parallel group (``model`` is then its shard); see tensor_parallel.py."""
        self.config = cfg = config or EngineConfig()
        if cfg.tensor_parallel_size > 1 and tp is None:
            raise ValueError(
                "tensor_parallel_size > 1: build the engine with LLM(...) or LLMEngine.from_config, which start the ranks"
            )
        self.tp = tp
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.fused_layers = fuse_model(model) if cfg.fused_kernels else 0
        shape = model_shape(model)
        self.vocab_size, self.max_model_len = shape.vocab_size, shape.max_model_len
        text_cfg = model.config.get_text_config()
        kv_heads = shape.num_kv_heads // (tp.world_size if tp else 1)  # a rank caches its own KV heads
        spec = CacheSpec(shape.num_layers, kv_heads, shape.head_dim, cfg.block_size, model.dtype)
        reserve = activation_reserve_bytes(
            shape, text_cfg.hidden_size, getattr(text_cfg, "intermediate_size", 4 * text_cfg.hidden_size), cfg
        )
        num_blocks = num_blocks_for(spec, cfg, self.device, reserve)
        if tp is not None:
            num_blocks = tp.agree_num_blocks(num_blocks)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_batch_tokens, cfg.max_num_seqs)
        self.runner = ModelRunner(
            model,
            _allocate_or_explain(spec, num_blocks, self.device),
            max_tokens=cfg.max_batch_tokens,
            max_seqs=cfg.max_num_seqs,
            max_blocks_per_seq=-(-self.max_model_len // cfg.block_size),
            use_kernels=self.device.type == "cuda" and kernels_available(),
            cuda_graphs=cfg.cuda_graphs,
        )
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
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.mode = cfg.mode if cfg.mode != "auto" else ("async" if self.device.type == "cuda" else "sync")
        self._prev_rows: dict[int, int] = {}
        self._in_flight: _InFlight | None = None
        self._next_seq_id = 0
        self._live_requests: dict[str, int] = {}
        self._unfinished = 0
        self._step_index = 0
        self._records: list[StepRecord] = []
        self._totals = StepTotals()
        self._started_at: float | None = None
        self._finished_at = 0.0
        self._last_gpu_end: float | None = None

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, engine_cfg: EngineConfig | None = None) -> LLMEngine:
        """Load the model and tokenizer ``model_cfg`` names, then build the engine."""
        engine_cfg = engine_cfg or EngineConfig()
        if engine_cfg.tensor_parallel_size > 1:
            from .tensor_parallel import ModelSource, start_engine

            return start_engine(ModelSource(model_cfg=model_cfg), engine_cfg, load_tokenizer(model_cfg))
        model = load_model(model_cfg, resolve_device(engine_cfg.device))
        return cls(model, load_tokenizer(model_cfg), engine_cfg)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> None:
        """Queue ``params.n`` samples of ``prompt``; raises RequestError if it can never be served."""
        params = params or SamplingParams()
        request_id = str(request_id)
        if request_id in self._live_requests:
            raise RequestError(f"request id {request_id!r} is already in flight")
        ids = tokenize_prompt(prompt, self.tokenizer, self.vocab_size)
        total = len(ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} = {total} exceeds "
                f"the model's context length {self.max_model_len}"
            )
        blocks = -(-total // self.config.block_size)
        if blocks > self.block_manager.num_usable_blocks:
            raise RequestError(
                f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} needs {blocks} KV blocks, "
                f"more than the whole cache ({self.block_manager.num_usable_blocks})"
            )
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        if params.min_new_tokens and len(stop_ids) > MAX_SUPPRESS:
            raise RequestError(
                f"min_new_tokens supports at most {MAX_SUPPRESS} EOS + stop token ids, got {len(stop_ids)}"
            )
        for i in range(params.n):
            seed = (
                derive_seed(params.seed, "", i)
                if params.seed is not None
                else derive_seed(self.config.seed, str(request_id), i)
            )
            seq = Sequence(self._next_seq_id, str(request_id), i, ids, params, seed, stop_ids)
            self._next_seq_id += 1
            self.scheduler.add(seq)
            self._unfinished += 1
        self._live_requests[request_id] = params.n

    def has_unfinished_requests(self) -> bool:
        return self._unfinished > 0

    def num_unfinished(self) -> int:
        return self._unfinished

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            len(self.scheduler.running), len(self.scheduler.waiting), bm.num_used_blocks, bm.num_usable_blocks
        )

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[CompletionOutput]:
        """Advance generation by one step; returns the samples that finished.

        Sync: prepare, launch and process step N. Async: prepare and launch step N+1, then
        process step N's outputs while N+1 computes (outputs lag one step).
        """
        started = time.perf_counter()
        wall = time.time()
        if self._started_at is None:
            self._started_at = started
        batch = self.scheduler.schedule()
        launched = None
        if batch:
            arrays = build_step_arrays(batch, self.config.block_size, self._prev_rows)
            if self.tp is not None:
                self.tp.send_step(arrays)  # the other ranks launch the same step
            launched = self.runner.launch(arrays)
            self._prev_rows = {it.seq.seq_id: row for row, it in enumerate(batch.sampled)}
            current = _InFlight(
                batch, launched, wall, time.perf_counter() - started - launched.inline_compute_s
            )
        else:
            current = None
        finished: list[CompletionOutput] = []
        if self.mode == "async":
            if self._in_flight is not None:
                finished = self._complete(self._in_flight)
            self._in_flight = current
        elif current is not None:
            finished = self._complete(current)
        self._finished_at = time.perf_counter()
        return finished

    def _complete(self, step: _InFlight) -> list[CompletionOutput]:
        tokens, logprobs, gpu_start, gpu_end = self.runner.collect(step.launched)
        self._record(step, gpu_start, gpu_end)
        return self._process(step.batch, tokens, logprobs)

    def _process(
        self, batch: ScheduledBatch, tokens: list[int], logprobs: list[float]
    ) -> list[CompletionOutput]:
        finished = []
        for it, token, lp in zip(batch.sampled, tokens, logprobs, strict=True):
            seq = it.seq
            if seq.is_finished:
                continue  # finished in the step before; this token was computed one step ahead
            seq.num_pending_tokens -= 1
            if token == INVALID_TOKEN:
                seq.error = (
                    f"the model produced NaN or inf logits at output position {len(seq.output_token_ids)}"
                )
                finished.append(self._finish(seq, "error"))
                continue
            seq.output_token_ids.append(token)
            if seq.params.logprobs:
                seq.output_logprobs.append(lp)
            try:
                reason = self._stop_reason(seq, token)
            except Exception as exc:  # one request's failure must not stop the others
                seq.error = f"{type(exc).__name__}: {exc}"
                reason = "error"
            if reason is not None:
                finished.append(self._finish(seq, reason))
            elif seq.num_computed_tokens // self.config.block_size > seq.num_hashed_blocks:
                self.block_manager.register_full_blocks(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        n_out = len(seq.output_token_ids)
        if token in seq.stop_ids and n_out >= params.min_new_tokens:
            return "stop"
        if params.stop and self.detokenizer is not None:
            new = self.detokenizer.append(seq)
            if new and n_out >= params.min_new_tokens:
                cut = find_stop(seq.text, len(new), params.stop)
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    seq.finish_reason = "stop_string"
                    return "stop"
        if n_out >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> CompletionOutput:
        stopped_by_string = seq.finish_reason == "stop_string"
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self.scheduler.finish(seq)
        self._unfinished -= 1
        left = self._live_requests.pop(seq.request_id) - 1
        if left:
            self._live_requests[seq.request_id] = left
        text = seq.text
        if not stopped_by_string and self.detokenizer is not None:
            try:
                text = self.detokenizer.final_text(seq)
            except Exception as exc:
                seq.error, reason = f"{type(exc).__name__}: {exc}", "error"
        return CompletionOutput(
            request_id=seq.request_id,
            index=seq.sample_index,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=text,
            finish_reason=reason,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs else None,
            error=seq.error,
        )

    # -- timing -----------------------------------------------------------------------------
    def _record(self, step: _InFlight, gpu_start: float, gpu_end: float) -> None:
        idle = 0.0 if self._last_gpu_end is None else max(0.0, gpu_start - self._last_gpu_end) / 1000
        self._last_gpu_end = gpu_end
        batch = step.batch
        record = StepRecord(
            step=self._step_index,
            start_time=step.wall_start,
            cpu_prep_s=step.prep_s,
            gpu_compute_s=(gpu_end - gpu_start) / 1000,
            gpu_idle_s=idle,
            num_seqs=len(batch.items),
            prefill_tokens=batch.prefill_tokens,
            decode_tokens=batch.decode_tokens,
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_usable_blocks,
            mode=self.mode,
            preempted=len(batch.preempted),
        )
        self._step_index += 1
        self._records.append(record)
        self._totals.add(record)

    def reset_stats(self) -> None:
        """Start the run summary afresh on an idle engine (after a warm-up, say); step records are dropped."""
        if self.has_unfinished_requests():
            raise RuntimeError("reset_stats needs an idle engine: requests are still running")
        if self._in_flight is not None:  # the async loop's last step, computed one step ahead
            self.runner.collect(self._in_flight.launched)
            self._in_flight = None
        self._records, self._totals, self._started_at, self._last_gpu_end = [], StepTotals(), None, None

    def pop_step_records(self) -> list[StepRecord]:
        """Step records since the last call."""
        records, self._records = self._records, []
        return records

    def summary(self) -> RunSummary:
        """Totals since the first step; wall time runs from the first step to the latest one."""
        wall = 0.0 if self._started_at is None else self._finished_at - self._started_at
        return self._totals.summary(wall)

    def close(self) -> None:
        """Free the cache and model references (the GPU memory returns to the allocator).

        With tensor parallelism, rank 0 also stops the other ranks."""
        if self.tp is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.tp.close()
        self.runner.kv_caches.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
