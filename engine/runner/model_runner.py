"""Run steps on the device: copy inputs in, fill carried-over tokens, forward, sample, copy outputs out.

``launch`` enqueues a step on the pipeline's streams and returns at once on CUDA; ``collect``
waits for that step's outputs (a blocking event) and reads them. Every step, decode-only or
mixed with prefill chunks, of up to the largest captured size replays a CUDA graph captured per
slot, padded token count and sampling flags (the paged-attention kernel takes any mix of
sequences at a fixed token count), all graphs in one shared memory pool; larger steps, and every
step on CPU or with ``cuda_graphs`` off, run eagerly. A step that scores prompt positions
(``SamplingParams.prompt_logprobs``) also runs eagerly: it keeps the logits of those positions
besides the sampling rows' and writes their logprobs to the slot's scoring outputs. Steps that
score nothing are unchanged (same graphs, same copies).

A step with a row asking for top logprobs (``SamplingParams.top_logprobs``) also writes every
row's ``top_width`` most likely tokens and their logprobs (raw distribution) to the slot's top
outputs and copies them back with the sampled tokens; the flag is part of the graph key, so steps
without such a row replay the same graphs as before and copy nothing more.

A step with constrained rows is launched ``deferred``: the forward pass (a forward-only graph, or
eager) is enqueued at once, and its sampling, with the token masks of those rows applied to the
logits by the sampler, once the masks are filled (``engine.guided`` explains why).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from transformers import PreTrainedModel

from engine.model.attention import ForwardContext, set_forward_context
from engine.model.batch_invariant import BatchInvariantMode
from engine.runner.io_slots import DeviceStep, IOSlot
from engine.runner.sampler import TokenMask, sample, score_tokens, top_logprobs
from engine.runner.sampler_kernel import fused_sampler_available, sample_fused
from engine.runner.step_layout import MAX_SUPPRESS, StepArrays
from engine.runner.streams import Pipeline


@dataclass
class Launched:
    """A step on its way through the pipeline."""

    slot: int
    num_rows: int
    inline_compute_s: float = 0.0
    """Time the forward pass took inside ``launch`` (on CPU it runs there; on CUDA it is only enqueued)."""
    num_scored: int = 0
    score_top_k: int = 0
    top: bool = False
    """The step computed its rows' top alternatives (``read_top_logprobs``)."""
    pending: _PendingSample | None = None
    """A deferred step's forward outputs, until ``ModelRunner.sample`` samples them."""


@dataclass
class _PendingSample:
    step: DeviceStep
    logits: torch.Tensor


def graph_token_sizes(max_tokens: int) -> list[int]:
    """Padded token counts that get a CUDA graph: fine steps for decode-sized batches, coarser above."""
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(384, max_tokens + 1, 128))
    return sorted({s for s in sizes if s <= max_tokens} | {max_tokens})


class ModelRunner:
    """Owns the two I/O slots, the streams and the CUDA graphs of one model."""

    def __init__(
        self,
        model: PreTrainedModel,
        kv_caches,
        *,
        max_tokens: int,
        max_seqs: int,
        max_blocks_per_seq: int,
        use_kernels: bool,
        cuda_graphs: bool,
        fused_sampler: bool = True,
        top_width: int = 0,
        batch_invariant: bool = False,
    ):
        """``top_width``: the top alternatives a step computes per row when one asks (0: never).
        ``batch_invariant``: forward passes in ``engine.model.batch_invariant``'s mode."""
        self.model = model
        self.kv_caches = kv_caches
        self.device = next(model.parameters()).device
        self.pipe = Pipeline(self.device)
        self.slots = [
            IOSlot(max_tokens, max_seqs, max_blocks_per_seq, self.device, self.pipe, top_width)
            for _ in range(2)
        ]
        self.top_width = top_width
        self.use_kernels = use_kernels
        self.batch_invariant = batch_invariant
        self.use_fused_sampler = fused_sampler and use_kernels and fused_sampler_available(self.device)
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and use_kernels
        self.max_seqs = max_seqs
        self.graph_sizes = graph_token_sizes(max_tokens) if self.use_graphs else []
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.graph_logits: dict[tuple, torch.Tensor] = {}
        """The output logits of each forward-only graph (the deferred steps'): views of its slot's buffer."""
        self.graph_pool = None
        self._next_slot = 0
        self.t0 = self.pipe.event(timing=True)
        with self.pipe.on(self.pipe.compute):
            self.t0.record()

    # -- the pipeline -------------------------------------------------------------------------
    def launch(self, a: StepArrays, deferred: bool = False) -> Launched:
        """Enqueue step ``a``: inputs in, forward, sampling, outputs out. ``deferred``: enqueue only the
        forward pass; ``token_masks`` and ``sample`` then add the masked sampling and the copy out."""
        index = self._next_slot
        self._next_slot ^= 1
        slot, prev = self.slots[index], self.slots[index ^ 1]
        top = a.any_top_logprobs and self.top_width > 0
        padded = 0 if a.num_scored else self._graph_size(a)
        sizes = self._padded_sizes(padded) if padded else (a.num_tokens, a.num_seqs, a.num_sampled)
        slot.h2d_done.synchronize()  # this slot's host buffers are free once their last copy is done
        slot.load(a, *sizes)
        pipe = self.pipe
        with pipe.on(pipe.h2d):
            pipe.h2d.wait_event(slot.compute_done)
            slot.copy_to_device()
            slot.h2d_done.record()
        logits, step = None, None
        with pipe.on(pipe.compute):
            pipe.compute.wait_event(slot.h2d_done)
            slot.compute_start.record()
            if padded:
                key = (index, padded, a.any_sampling, a.any_top_k_top_p, a.any_min_p, top, deferred)
                if key not in self.graphs:
                    self._capture(key, slot, prev)
                self.graphs[key].replay()
                logits = self.graph_logits.get(key)
            else:
                step = slot.device_step(*sizes, a, graph=False)
                if deferred:
                    logits = self._forward(step, prev.dev_tokens)
                else:
                    self._sample(step, self._forward(step, prev.dev_tokens))
            slot.compute_done.record()
        inline = 0.0 if pipe.cuda else slot.compute_start.elapsed_time(slot.compute_done) / 1000
        launched = Launched(index, a.num_sampled, inline, a.num_scored, a.score_top_k, top)
        if deferred:
            launched.pending = _PendingSample(step or slot.device_step(*sizes, a, graph=True), logits)
        else:
            self._copy_out(slot, launched)
        return launched

    def token_masks(self, launched: Launched, rows: list[int]) -> torch.Tensor:
        """The host buffer (int32 [len(rows), ceil(vocab / 32)]) to fill with the token masks of a deferred
        step's sampling ``rows`` (bit ``j`` of word ``w`` allows token ``32 * w + j``)."""
        words = -(-launched.pending.logits.shape[-1] // 32)
        return self.slots[launched.slot].host_masks(rows, words)

    def sample(self, launched: Launched) -> None:
        """Enqueue a deferred step's sampling, with the token masks filled into ``token_masks``, and its copy out."""
        slot, pending, pipe = self.slots[launched.slot], launched.pending, self.pipe
        with pipe.on(pipe.h2d):
            pipe.h2d.wait_event(slot.masks_read)
            slot.copy_masks_to_device()
            slot.masks_copied.record()
        with pipe.on(pipe.compute):
            pipe.compute.wait_event(slot.masks_copied)
            self._sample(pending.step, pending.logits, slot.token_mask())
            slot.masks_read.record()
            slot.compute_done.record()
        launched.pending = None
        self._copy_out(slot, launched)

    def _copy_out(self, slot: IOSlot, launched: Launched) -> None:
        pipe = self.pipe
        with pipe.on(pipe.d2h):
            pipe.d2h.wait_event(slot.compute_done)
            slot.copy_to_host(launched.num_rows, launched.num_scored, launched.score_top_k, launched.top)
            slot.d2h_done.record()

    def collect(self, launched: Launched) -> tuple[list[int], list[float], float, float]:
        """Sampled tokens, their logprobs, and the step's GPU start and end (ms since the runner began)."""
        slot = self.slots[launched.slot]
        slot.d2h_done.synchronize()
        n = launched.num_rows
        start = self.t0.elapsed_time(slot.compute_start)
        end = self.t0.elapsed_time(slot.compute_done)
        return slot.host_tokens[:n].tolist(), slot.host_logprobs[:n].tolist(), start, end

    def read_scores(self, launched: Launched) -> tuple[list[float], list[list[int]], list[list[float]]]:
        """A collected step's prompt scores: the logprob of each scored position's target token, and
        (``score_top_k`` > 0) the top token ids and their logprobs per position."""
        return self.slots[launched.slot].read_scores(launched.num_scored, launched.score_top_k)

    def read_top_logprobs(self, launched: Launched) -> tuple[np.ndarray, np.ndarray]:
        """A collected step's top alternatives per sampling row: ids (int32) and logprobs (float32),
        ``[rows, top_width]`` each, most likely first; views valid until this slot's next step."""
        return self.slots[launched.slot].read_top(launched.num_rows)

    # -- compute ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, step: DeviceStep, prev_tokens: torch.Tensor) -> torch.Tensor:
        """The forward pass of a step: its sampling rows' logits (scored prompt positions written out)."""
        # Carry-over: tokens the previous step sampled replace their placeholders, on the device.
        # (An invalid token of a failing request becomes 0: its step is discarded, the model must not see -1.)
        carried = prev_tokens[step.carry.clamp(min=0)].clamp(min=0)
        input_ids = torch.where(step.carry >= 0, carried, step.input_ids)
        score = step.score
        keep = step.logits_indices if score is None else torch.cat([step.logits_indices, score.indices])
        set_forward_context(
            ForwardContext(step.metadata, self.kv_caches, self.use_kernels, self.batch_invariant)
        )
        try:
            with BatchInvariantMode() if self.batch_invariant else contextlib.nullcontext():
                out = self.model(
                    input_ids=input_ids[None],
                    position_ids=step.metadata.positions[None],
                    logits_to_keep=keep,
                    use_cache=False,
                )
        finally:
            set_forward_context(None)
        logits = out.logits[0]
        if score is not None:
            rows = step.logits_indices.shape[0]
            score_tokens(
                logits[rows:], score.targets, score.logprobs_out, score.top_ids_out, score.top_logprobs_out
            )
            logits = logits[:rows]
        return logits

    @torch.inference_mode()
    def _sample(self, step: DeviceStep, logits: torch.Tensor, mask: TokenMask | None = None) -> None:
        if self.use_fused_sampler:
            tokens, logprobs = sample_fused(logits, step.sampling, want_logprobs=True, mask=mask)
        else:
            tokens, logprobs = sample(logits, step.sampling, want_logprobs=True, mask=mask)
        step.tokens_out.copy_(tokens)
        step.logprobs_out.copy_(logprobs)
        if step.top_ids_out is not None:
            top_logprobs(logits, step.top_ids_out, step.top_logprobs_out, tokens, logprobs)

    def _forward_and_sample(self, step: DeviceStep, prev_tokens: torch.Tensor) -> None:
        self._sample(step, self._forward(step, prev_tokens))

    def _graph_size(self, a: StepArrays) -> int:
        if not self.use_graphs or a.num_tokens > self.graph_sizes[-1]:
            return 0
        return next(s for s in self.graph_sizes if s >= a.num_tokens)

    def _padded_sizes(self, num_tokens: int) -> tuple[int, int, int]:
        """Tokens, sequences and sampling rows of a graph: a step has at most one sequence per token."""
        rows = min(num_tokens, self.max_seqs)
        return num_tokens, rows, rows

    @staticmethod
    def _idle_shape(
        any_sampling: bool, any_top_k_top_p: bool, any_min_p: bool, any_top_logprobs: bool = False
    ) -> SimpleNamespace:
        """The host-side sizes a padded idle step (or a captured graph) is built with."""
        return SimpleNamespace(
            max_query_len=1,
            max_context_len=1,
            block_tables=None,
            any_sampling=any_sampling,
            any_top_k_top_p=any_top_k_top_p,
            any_min_p=any_min_p,
            any_top_logprobs=any_top_logprobs,
        )

    def probe(self) -> None:
        """One eager forward of a one-token padding step (it writes only the null block), so that a
        model whose attention asks for what is not implemented fails at start, not in a step."""
        slot, prev = self.slots[0], self.slots[1]
        if self.pipe.cuda:  # the buffers were zeroed on the allocating stream: finish that first
            torch.cuda.synchronize(self.device)
        with self.pipe.on(self.pipe.compute):
            self._load_idle_step(slot, 1)  # on the stream that reads it
            self._forward_and_sample(
                slot.device_step(1, 1, 1, self._idle_shape(False, False, False), graph=True), prev.dev_tokens
            )
        if self.pipe.cuda:
            torch.cuda.synchronize(self.device)

    def _capture(self, key: tuple, slot: IOSlot, prev: IOSlot) -> None:
        """Capture the step of ``key``: forward and sampling, or (deferred) the forward alone, whose
        logits stay in the slot's logits buffer for the sampling launched after it."""
        _, size, any_sampling, any_top_k_top_p, any_min_p, top, deferred = key
        shape = self._idle_shape(any_sampling, any_top_k_top_p, any_min_p, top)
        step = slot.device_step(*self._padded_sizes(size), shape, graph=True)
        stream = self.pipe.compute
        if deferred:  # every forward-only graph of a slot writes into the slot's one logits buffer

            def run(step: DeviceStep, prev_tokens: torch.Tensor) -> torch.Tensor:
                return slot.keep_logits(self._forward(step, prev_tokens))

        else:
            run = self._forward_and_sample
        # Warm-up outside the capture: Triton compiles and lazy initialisation (that buffer) happen here.
        run(step, prev.dev_tokens)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool, stream=stream):
            logits = run(step, prev.dev_tokens)
        if deferred:
            self.graph_logits[key] = logits
        if self.graph_pool is None:
            self.graph_pool = graph.pool()
        self.graphs[key] = graph

    def release_graphs(self) -> None:
        """Drop the captured graphs and their memory pool (they point into the cache being freed)."""
        self.graphs.clear()
        self.graph_pool = None

    def capture_graphs(
        self,
        any_sampling: bool = False,
        any_top_k_top_p: bool = False,
        any_min_p: bool = False,
        top: bool = False,
    ) -> int:
        """Capture the graph of every padded token count for both slots, largest first, for steps with
        these sampling flags (greedy at start; ``LLMEngine.capture_graphs_for`` adds a run's own). Only
        while no step is in flight: the padding steps are built in the slots' buffers."""
        if not self.use_graphs:
            return 0
        flags = (any_sampling, any_top_k_top_p, any_min_p, top and self.top_width > 0, False)
        with self.pipe.on(self.pipe.compute):
            for size in reversed(self.graph_sizes):
                for index in (0, 1):
                    slot, prev = self.slots[index], self.slots[index ^ 1]
                    key = (index, size, *flags)
                    if key not in self.graphs:
                        self._load_idle_step(slot, size)
                        self._capture(key, slot, prev)
        torch.cuda.synchronize(self.device)
        return len(self.graphs)

    def _load_idle_step(self, slot: IOSlot, size: int) -> None:
        """Fill a slot's device buffers with a harmless padded step (every row a padding row)."""
        _, rows, _ = self._padded_sizes(size)
        slot.dev_int.zero_()
        arange = torch.arange(size, device=self.device)
        slot.view("carry", size).fill_(-1)
        slot.view("context_lens", rows).fill_(1)
        slot.view("query_seq", size).copy_(arange.clamp(max=rows - 1))
        slot.view("logits_indices", rows).copy_(arange[:rows])
        slot.view("suppress", rows * MAX_SUPPRESS).fill_(-1)
        slot.dev_float.zero_()
