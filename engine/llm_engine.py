"""The streaming engine: add requests, step, collect samples as they finish."""

from __future__ import annotations

import gc
import hashlib
import threading
import time
from dataclasses import dataclass

import numpy as np

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer, find_stop
from engine.guided.decoder import GuidedDecoder
from engine.guided_steps import GuidedRows
from engine.model.loader import eos_token_ids
from engine.outputs import CompletionOutput, RequestError
from engine.runner.model_runner import Launched, ModelRunner
from engine.runner.sampler import INVALID_TOKEN
from engine.runner.step_layout import MAX_SUPPRESS
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import SeqStatus, Sequence
from engine.step_builder import build_step_arrays
from engine.timing import RunSummary, StepRecord, StepTotals
from engine.tokenization import PromptType, tokenize_prompt
from engine.worker import Worker


def derive_seed(base: int, key: str, sample_index: int) -> int:
    digest = hashlib.blake2b(f"{base}/{key}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


@dataclass
class _LaunchedStep:
    batch: ScheduledBatch
    launched: Launched
    wall_start: float
    prep_s: float
    guided: GuidedRows | None = None
    """The constrained rows: the step's sampling waits for their masks (``engine.guided``)."""
    sampling_pending: bool = False
    """Its forward is launched, its sampling not yet (``_launch_sampling``)."""


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine's load."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int


class LLMEngine:
    """Continuous-batching generation over a transformers model with a paged KV cache."""

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        """``model``: a :class:`Worker`, or a model on its device (one device; ``engine.build`` makes
        engines from paths, configs and for tensor parallelism)."""
        self.config = cfg = config or EngineConfig()
        if not isinstance(model, Worker):
            if cfg.tensor_parallel_size > 1:
                raise ValueError(
                    "tensor_parallel_size > 1: build the engine with LLM(...) or engine.build.build_engine, "
                    "which start the ranks"
                )
            model = Worker(model, cfg)
        self.worker = worker = model
        self.model, self.tokenizer = worker.model, tokenizer
        self.device, self.runner = worker.device, worker.runner
        self.vocab_size, self.max_model_len = worker.vocab_size, worker.max_model_len
        self.fused_layers, self.graph_capture_s = worker.fused_layers, worker.graph_capture_s
        self.block_manager = BlockManager(worker.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_batch_tokens, cfg.max_num_seqs)
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.eos_ids = eos_token_ids(self.model, tokenizer)
        self.mode = cfg.mode if cfg.mode != "auto" else ("async" if self.device.type == "cuda" else "sync")
        self._prev_rows: dict[int, int] = {}
        self._in_flight: _LaunchedStep | None = None
        self._next_seq_id = 0
        self._live_requests: dict[str, int] = {}
        self._unfinished = 0
        self._step_index = 0
        self._records: list[StepRecord] = []
        self._totals = StepTotals()
        self._started_at: float | None = None
        self._finished_at = 0.0
        self._last_gpu_end: float | None = None
        self.guided: GuidedDecoder | None = None
        """Constrained decoding, built by the first constrained request."""
        self._guided_lock = threading.Lock()
        self._gc_frozen = False

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> None:
        """Queue ``params.n`` samples of ``prompt``; raises RequestError if it can never be served."""
        params = params or SamplingParams()
        request_id = str(request_id)
        if request_id in self._live_requests:
            raise RequestError(f"request id {request_id!r} is already in flight")
        if params.stop and self.detokenizer is None:
            raise RequestError(
                f"stop strings {list(params.stop)!r} need a tokenizer to find them in the text, and this engine "
                "has none: pass a tokenizer to the engine, or stop on token ids (stop_token_ids)"
            )
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
        self._check_top_logprobs(params.top_logprobs)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        if params.min_new_tokens and len(stop_ids) > MAX_SUPPRESS:
            raise RequestError(
                f"min_new_tokens supports at most {MAX_SUPPRESS} EOS + stop token ids, got {len(stop_ids)}"
            )
        compiled = self.compile_constraint(params) if params.constraint is not None else None
        for i in range(params.n):
            seed = (
                derive_seed(params.seed, "", i)
                if params.seed is not None
                else derive_seed(self.config.seed, str(request_id), i)
            )
            seq = Sequence(self._next_seq_id, str(request_id), i, ids, params, seed, stop_ids)
            if compiled is not None:
                seq.guide = self.guided.start(compiled, params)
            self._next_seq_id += 1
            self.scheduler.add(seq)
            self._unfinished += 1
        self._live_requests[request_id] = params.n

    def _check_top_logprobs(self, k: int) -> None:
        limit = self.config.max_top_logprobs
        if k > limit:
            raise RequestError(
                f"top_logprobs={k} exceeds this engine's limit of {limit} alternatives per token: raise "
                f"EngineConfig.max_top_logprobs (engine.max_top_logprobs in a job) to at least {k}"
            )
        if k > self.vocab_size:
            raise RequestError(f"top_logprobs={k} exceeds the model's vocabulary of {self.vocab_size} tokens")

    def compile_constraint(self, params: SamplingParams):
        """The compiled grammar of ``params``' constraint, from the cache or compiled now (thread-safe: a
        caller may compile ahead, off the loop); RequestError if it is invalid or cannot be served."""
        if self.config.tensor_parallel_size > 1:
            raise RequestError("constrained decoding is not supported with tensor_parallel_size > 1 yet")
        with self._guided_lock:
            if self.guided is None:
                if self.tokenizer is None:
                    raise RequestError(
                        "constrained decoding needs a tokenizer (each token's text): pass one to the engine"
                    )
                self.guided = GuidedDecoder(self.tokenizer, self.vocab_size, self.eos_ids)
        return self.guided.compile(params)

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

        A step with constrained rows is launched in two parts (``engine.guided``). Async: its forward
        first; once step N's tokens have advanced the matchers, its masks are filled on the decoder's
        thread while this one processes step N's outputs and prepares step N+2, and its sampling is
        launched right before step N+2's forward. Sync: masks filled, then sampling, in the same call.
        """
        started = time.perf_counter()
        wall = time.time()
        if self._started_at is None:
            self._started_at = started
        if self._unfinished and not self._gc_frozen:
            self._hold_gc()
        batch = self.scheduler.schedule()
        current = None
        in_flight = self._in_flight
        if batch:
            arrays = build_step_arrays(batch, self.config.block_size, self._prev_rows)
            guided = GuidedRows.of(batch) if self.guided is not None and self.guided.live > 0 else None
            if in_flight is not None and in_flight.sampling_pending:
                self._launch_sampling(in_flight)  # before this step's forward, which carries its tokens over
            launched = self.runner.launch(arrays, deferred=True) if guided else self.runner.launch(arrays)
            self._prev_rows = {it.seq.seq_id: row for row, it in enumerate(batch.sampled)}
            prep = time.perf_counter() - started - launched.inline_compute_s
            current = _LaunchedStep(batch, launched, wall, prep, guided, guided is not None)
        finished: list[CompletionOutput] = []
        if self.mode == "async":
            if in_flight is not None:
                if in_flight.sampling_pending:
                    self._launch_sampling(in_flight)
                finished = self._complete(in_flight, current)
            elif current is not None and current.guided is not None:
                self._start_fill(current)
            self._in_flight = current
        elif current is not None:
            if current.guided is not None:
                g = current.guided
                g.masks = self.runner.token_masks(current.launched, g.rows)
                self.guided.fill(g.guides, g.masks)
                self._launch_sampling(current)
            finished = self._complete(current, None)
        self._finished_at = time.perf_counter()
        if self._gc_frozen and not self._unfinished:
            self._release_gc()
        return finished

    def _hold_gc(self) -> None:
        """Keep the objects that exist when generation starts (the model, torch, the requests so far) out
        of the garbage collector's full collections until the engine is idle again (``gc.freeze``).

        A full collection walks every tracked object: with torch and a model loaded, 400k objects and
        about 0.2 s on a development machine, a pause of the step loop that the GPU waits through (one or
        more per run). Frozen objects are still freed when their last reference goes; only cyclic
        garbage that existed when generation started waits until the engine is idle (``_release_gc``)."""
        gc.freeze()
        self._gc_frozen = True

    def _release_gc(self) -> None:
        gc.unfreeze()
        self._gc_frozen = False

    def _start_fill(self, step: _LaunchedStep) -> None:
        """Start filling a deferred step's masks on the decoder's thread (its matchers are up to date)."""
        g = step.guided
        g.masks = self.runner.token_masks(step.launched, g.rows)
        g.filling = self.guided.start_fill(g.guides, g.masks)

    def _launch_sampling(self, step: _LaunchedStep) -> None:
        """Enqueue a deferred step's sampling, once its masks are filled."""
        step.guided.wait_for_masks()
        self.runner.sample(step.launched)
        step.sampling_pending = False

    def _complete(self, step: _LaunchedStep, following: _LaunchedStep | None) -> list[CompletionOutput]:
        """Collect and process ``step``. Its constrained rows' tokens advance their matchers first, then
        ``following`` (async: the step launched after it) gets its masks filled on the decoder's thread
        while this one processes ``step``'s outputs and prepares the next step."""
        tokens, logprobs, gpu_start, gpu_end = self.runner.collect(step.launched)
        self._record(step, gpu_start, gpu_end)
        refused = self._advance_matchers(step.guided, tokens) if step.guided is not None else set()
        if following is not None and following.guided is not None:
            self._start_fill(following)
        if step.batch.num_scored:
            step.batch.store_scores(*self.runner.read_scores(step.launched))
        top = self.runner.read_top_logprobs(step.launched) if step.launched.top else None
        return self._process(step.batch, tokens, logprobs, top, refused)

    def _advance_matchers(self, g: GuidedRows, tokens: list[int]) -> set[int]:
        """Advance the matchers of a collected step's constrained rows with the tokens ``_process`` will keep
        (one call into the library); returns the rows whose token the constraint refused."""
        rows, guides, kept = g.kept_tokens(tokens)
        ok = self.guided.advance(guides, kept)
        return {row for row, a in zip(rows, ok, strict=True) if not a}

    def _process(
        self,
        batch: ScheduledBatch,
        tokens: list[int],
        logprobs: list[float],
        top: tuple[np.ndarray, np.ndarray] | None = None,
        refused: set[int] | frozenset[int] = frozenset(),
    ) -> list[CompletionOutput]:
        """Apply a step's sampled tokens (and, when asked, each row's top alternatives: ``top``); the
        constrained rows' matchers have advanced already (``refused``: rows whose token they refused)."""
        finished = []
        max_len, block_size, done = self.max_model_len, self.config.block_size, SeqStatus.FINISHED
        for row, (it, token, lp) in enumerate(zip(batch.sampled, tokens, logprobs, strict=True)):
            seq = it.seq
            if seq.status is done:
                continue  # finished in the step before; this token was computed one step ahead
            if seq.discard_pending:
                seq.discard_pending -= 1  # sampled after a token that forced tokens now follow
                continue
            seq.num_pending_tokens -= 1
            if seq.params.max_new_tokens == 0:  # scoring only: the prefill is done, the token unused
                finished.append(self._finish(seq, "length"))
                continue
            if token == INVALID_TOKEN:
                seq.error = (
                    f"the model produced NaN or inf logits at output position {len(seq.output_token_ids)}"
                )
                finished.append(self._finish(seq, "error"))
                continue
            seq.output_token_ids.append(token)
            if seq.params.logprobs:
                seq.output_logprobs.append(lp)
            if seq.top is not None:
                seq.top.append(top[0][row], top[1][row])
            if refused and row in refused:
                seq.error = (
                    f"token {token} at output position {len(seq.output_token_ids) - 1} breaks the constraint"
                )
                finished.append(self._finish(seq, "error"))
                continue
            params, n_out = seq.params, len(seq.output_token_ids)
            if (
                token in seq.stop_ids
                or params.stop
                or params.think_end_ids
                or n_out >= params.max_new_tokens
                or seq.prompt_len + n_out + seq.num_pending_tokens >= max_len
            ):  # else none of the checks below can end it (most rows, most steps)
                try:
                    reason = self._stop_reason(seq, token)
                    if reason is None and params.think_end_ids and not seq.think_closed:
                        reason = self._think_budget(seq)
                except Exception as exc:  # one request's failure must not stop the others
                    seq.error = f"{type(exc).__name__}: {exc}"
                    reason = "error"
                if reason is not None:
                    finished.append(self._finish(seq, reason))
                    continue
            if seq.num_computed_tokens // block_size > seq.num_hashed_blocks:
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

    def _think_budget(self, seq: Sequence) -> str | None:
        """Close the thinking span: seen the end marker, or force it once ``max_think_tokens`` tokens are out.

        The forced ids become known output tokens, so the next step feeds them (with the last sampled
        token) and samples the answer's first token after them. In the async loop the next step is
        already sampling a token after the last one: that sample is dropped when it arrives.
        """
        params, out = seq.params, seq.output_token_ids
        end = params.think_end_ids
        if len(out) >= len(end) and out[-len(end) :] == end:
            seq.think_closed = True
            return None
        if params.max_think_tokens is None or len(out) < params.max_think_tokens:
            return None
        seq.think_closed = True
        seq.discard_pending += seq.num_pending_tokens
        seq.num_pending_tokens = 0
        room = min(params.max_new_tokens - len(out), self.max_model_len - seq.num_tokens)
        forced = end[: max(0, room)]
        out.extend(forced)
        if params.logprobs:
            seq.output_logprobs.extend([0.0] * len(forced))
        if seq.top is not None:
            seq.top.append_forced(forced)
        if len(out) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> CompletionOutput:
        stopped_by_string = seq.finish_reason == "stop_string"
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        if seq.guide is not None:
            self.guided.release(seq.guide)
            seq.guide = None
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
        top_ids, top_lps = seq.top.arrays() if seq.top is not None else (None, None)
        return CompletionOutput(
            request_id=seq.request_id,
            index=seq.sample_index,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=text,
            finish_reason=reason,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs else None,
            error=seq.error,
            prompt_logprobs=seq.prompt_logprobs,
            prompt_top_logprobs=seq.prompt_top,
            top_token_ids=top_ids,
            top_logprobs=top_lps,
        )

    # -- timing -----------------------------------------------------------------------------
    def _record(self, step: _LaunchedStep, gpu_start: float, gpu_end: float) -> None:
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

    def capture_graphs_for(self, params: SamplingParams) -> float:
        """Capture now the CUDA graphs that steps sampling with ``params`` replay, at every batch size
        (otherwise the first step of each size captures its own, in the middle of the run); the
        seconds it took. Between runs only (no request in flight); nothing to do without graphs, on
        CPU, or with tensor parallelism (whose ranks capture together, step by step)."""
        runner = self.runner
        if not isinstance(runner, ModelRunner) or not runner.use_graphs or self.worker.tp is not None:
            return 0.0
        if self.has_unfinished_requests():
            raise RuntimeError("capture_graphs_for: requests are in flight")
        if self._in_flight is not None:  # the async loop's last step, computed one step ahead
            self.runner.collect(self._in_flight.launched)
            self._in_flight = None
        sampling = params.temperature > 0
        started = time.perf_counter()
        runner.capture_graphs(
            any_sampling=sampling,
            any_top_k_top_p=sampling and (params.top_k > 0 or params.top_p < 1),
            any_min_p=sampling and params.min_p > 0,
            top=params.top_logprobs > 0,
        )
        return time.perf_counter() - started

    def reset_stats(self) -> None:
        """Start the run summary afresh on an idle engine (after a warm-up, say); step records are dropped."""
        if self.has_unfinished_requests():
            raise RuntimeError("reset_stats needs an idle engine: requests are still running")
        self._drain()  # the async loop's last step, computed one step ahead
        self._records, self._totals, self._started_at, self._last_gpu_end = [], StepTotals(), None, None

    def pop_step_records(self) -> list[StepRecord]:
        """Step records since the last call."""
        records, self._records = self._records, []
        return records

    def summary(self) -> RunSummary:
        """Totals since the first step; wall time runs from the first step to the latest one."""
        wall = 0.0 if self._started_at is None else self._finished_at - self._started_at
        return self._totals.summary(wall)

    @property
    def tp(self):
        """Rank 0's tensor-parallel group, or None on one device."""
        return self.worker.tp

    def close(self) -> None:
        """Free the cache and model references (the GPU memory returns to the allocator).

        The async loop's last step, launched one step ahead, is waited for first: freed while it
        still runs, its cache writes would land in whatever the allocator hands out next (another
        engine's inputs, in one process). With tensor parallelism, rank 0 also stops the other ranks."""
        if self._gc_frozen:
            self._release_gc()
        self._drain()
        if self.guided is not None:
            self.guided.close()
        self.worker.close()

    def _drain(self) -> None:
        """Wait for the async loop's last step (its sampling launched first if its masks were pending)."""
        if self._in_flight is not None:
            if self._in_flight.sampling_pending:
                self._launch_sampling(self._in_flight)
            self.runner.collect(self._in_flight.launched)
            self._in_flight = None
        if self.guided is not None:
            self.guided.wait()
