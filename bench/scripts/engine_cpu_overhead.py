"""CPU cost of one engine step without the model: W2-shaped requests, forward pass replaced by a stub.

Measures what the async loop must hide behind the GPU's step time: scheduling, building the
step's inputs, loading an I/O slot and processing the sampled tokens; and, within that, the
prefix-cache keys (SHA-256 of each full block, ``engine.block_manager.block_hash``).

With ``--json-schema`` (a schema file, or ``w2`` for ``bench.json_schemas.W2_SCHEMA``) the requests
are constrained (``--guided-fraction`` of them; 0 gives the unconstrained run of the same model), the
model takes the Qwen2 tokenizer (``--tokenizer``) and vocabulary, and the stub samples each masked
row's token uniformly among those its mask allows (seeded; its own time is left out of the figures),
as a random model's greedy choice under the mask would. The guided part of a step is timed apart.

The mask fill runs on the decoder's thread while the loop goes on; the loop's own guided work is
the constrained rows' lists, the matchers' advance, the fill's hand-off and the wait for it.

It also prints the median and 10th percentile of the steps that decode 256 rows (the common case),
the garbage collections during the timed loop, and what one full collection costs at the end.

Usage: python -m bench.scripts.engine_cpu_overhead [--temperature 1 --top-p 0.95] [--profile]
       python -m bench.scripts.engine_cpu_overhead --json-schema w2 [--guided-fraction 0] [--tokenizer DIR]
"""

import argparse
import cProfile
import gc
import pstats
import random
import time
from collections import defaultdict

import numpy as np
import torch
from transformers import LlamaConfig

from engine import EngineConfig, LLMEngine, SamplingParams, build_random_model
from engine import block_manager as block_manager_module
from engine.runner.model_runner import Launched, _PendingSample


class TimedBlockHash:
    """Wraps ``block_hash`` to count the blocks hashed and the time spent (the wrapper's own cost included)."""

    def __init__(self) -> None:
        self.inner = block_manager_module.block_hash
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, parent, tokens):
        t0 = time.perf_counter()
        out = self.inner(parent, tokens)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


class GcTimes:
    """A ``gc.callbacks`` entry: collections and their time, by generation."""

    def __init__(self) -> None:
        self.count: dict[int, int] = defaultdict(int)
        self.seconds: dict[int, float] = defaultdict(float)
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._start

    def summary(self) -> str:
        return (
            ", ".join(f"{g}: {self.count[g]}, {self.seconds[g] * 1e3:.1f}" for g in sorted(self.count))
            or "none"
        )


class Timers:
    """Seconds spent in wrapped callables, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        seconds = self.seconds

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - t0

        return timed


def draw_allowed(words: np.ndarray, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``words`` (int32 bitmask words), uniform among those the row allows."""
    n = words.shape[0]
    cand = rng.integers(0, vocab, size=(n, 16))
    bits = (words[np.arange(n)[:, None], cand >> 5] >> (cand & 31)) & 1
    hit = bits.argmax(axis=1)
    out = cand[np.arange(n), hit]
    for r in np.nonzero(bits[np.arange(n), hit] == 0)[0]:  # few tokens allowed: draw among them all
        allowed = np.nonzero(np.unpackbits(words[r].view(np.uint8), bitorder="little")[:vocab])[0]
        out[r] = rng.choice(allowed)
    return out


def stub_runner(engine: LLMEngine, timers: Timers, vocab: int) -> None:
    """Replace the forward pass and the sampling: unmasked rows get token 7, masked rows a token their mask allows."""
    runner = engine.runner
    rng = np.random.default_rng(0)
    fake_logits = torch.empty((1, vocab))
    drawn: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def launch(a, deferred=False):
        index = runner._next_slot
        runner._next_slot ^= 1
        runner.slots[index].load(a, a.num_tokens, a.num_seqs, a.num_sampled)
        launched = Launched(index, a.num_sampled)
        drawn.pop(id(launched), None)
        if deferred:
            launched.pending = _PendingSample(None, fake_logits)
        return launched

    def sample(launched):  # the real one enqueues the mask copy and the sampling: nothing to time on CPU here
        t0 = time.perf_counter()
        slot = runner.slots[launched.slot]
        n = slot._num_masked
        rows = slot._masks.host_rows[:n].numpy().copy()
        drawn[id(launched)] = (rows, draw_allowed(slot._masks.host_words[:n].numpy(), vocab, rng))
        launched.pending = None
        timers.seconds["stub"] += time.perf_counter() - t0

    def collect(launched):
        tokens = [7] * launched.num_rows
        if id(launched) in drawn:
            rows, values = drawn.pop(id(launched))
            for r, v in zip(rows.tolist(), values.tolist(), strict=True):
                tokens[r] = v
        return tokens, [0.0] * launched.num_rows, 0.0, 1.0

    runner.launch = launch
    runner.sample = sample
    runner.collect = collect


def instrument_guided(engine: LLMEngine, timers: Timers) -> None:
    """Time the guided parts of a step, once the decoder exists (after the first constrained request)."""
    engine._advance_matchers = timers.wrap("advance", engine._advance_matchers)
    engine._guided_rows = timers.wrap("rows", engine._guided_rows)
    engine.guided.start_fill = timers.wrap("start_fill", engine.guided.start_fill)
    engine._launch_sampling = timers.wrap("launch_sampling", engine._launch_sampling)
    engine.runner.token_masks = timers.wrap("host_masks", engine.runner.token_masks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--profile", action="store_true", help="print the functions that take the time")
    parser.add_argument("--json-schema", help="constrain requests to this schema file ('w2': W2_SCHEMA)")
    parser.add_argument("--guided-fraction", type=float, default=1.0)
    parser.add_argument("--tokenizer", help="the Qwen2 tokenizer (default: BATCHGEN_QWEN2_TOKENIZER)")
    parser.add_argument("--requests", type=int, default=1024)
    args = parser.parse_args(argv)
    load = None
    if args.json_schema is not None:
        from bench.guided_workload import QWEN2_VOCAB, guided_load

        load = guided_load(args.json_schema, args.guided_fraction, args.tokenizer)
    vocab = QWEN2_VOCAB if load else 512
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=vocab,
        max_position_embeddings=2048,
        eos_token_id=load.tokenizer().eos_token_id if load else 2,
    )
    engine = LLMEngine(
        build_random_model(cfg, "float32", "cpu"),
        load.tokenizer() if load else None,
        EngineConfig(max_num_seqs=256, max_batch_tokens=2048, num_blocks=40000, mode="async"),
    )
    timers = Timers()
    stub_runner(engine, timers, vocab)
    rng = random.Random(0)
    guided_requests = 0
    for i in range(args.requests):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(64, 512))]
        common = dict(
            temperature=args.temperature, top_p=args.top_p, seed=i, max_new_tokens=rng.randint(64, 512)
        )
        if load is not None and load.is_guided(i):
            params = SamplingParams(**common, json_schema=load.schema)
            guided_requests += 1
        else:
            params = SamplingParams(**common, ignore_eos=True)
        engine.add_request(str(i), prompt, params)
    if engine.guided is not None:
        instrument_guided(engine, timers)
    engine._process = timers.wrap("process", engine._process)
    timed = TimedBlockHash()
    block_manager_module.block_hash = timed  # the module function the engine's BlockManager calls
    scheduled = []  # each step's batch: (tokens, decode tokens)
    schedule = engine.scheduler.schedule

    def schedule_and_note():
        batch = schedule()
        scheduled.append((batch.num_tokens, batch.decode_tokens))
        return batch

    engine.scheduler.schedule = schedule_and_note
    collections = GcTimes()
    gc.callbacks.append(collections)
    profiler = cProfile.Profile() if args.profile else None
    steps, start, step_times = 0, time.perf_counter(), []
    reasons: dict[str, int] = defaultdict(int)
    stub = timers.seconds
    if profiler:
        profiler.enable()
    while engine.has_unfinished_requests():
        t0, stub0 = time.perf_counter(), stub["stub"]
        for out in engine.step():
            reasons[out.finish_reason] += 1
        step_times.append(time.perf_counter() - t0 - (stub["stub"] - stub0))
        steps += 1
    if profiler:
        profiler.disable()
    s = timers.seconds
    per_step = (time.perf_counter() - start - s["stub"]) / steps
    print(f"{steps} steps, {per_step * 1000:.2f} ms of CPU per step (the stub's sampling left out)")
    # Steps that decode 256 rows (and prefill nothing) are the common case; their median and 10th
    # percentile move less than the mean when the machine is shared.
    decode = sorted(t for t, (n, d) in zip(step_times, scheduled, strict=True) if n == d == 256)
    if decode:
        print(
            f"{len(decode)} steps of 256 decode rows: median {decode[len(decode) // 2] * 1000:.3f} ms, "
            f"10th percentile {decode[len(decode) // 10] * 1000:.3f} ms"
        )
    print(
        f"prefix-cache keys: {timed.calls} blocks, {timed.seconds / timed.calls * 1e6:.2f} us per block, "
        f"{timed.seconds / steps * 1e6:.1f} us per step ({timed.seconds / steps / per_step:.1%} of the step)"
    )
    print(f"output processing (_process): {s['process'] / steps * 1e3:.3f} ms per step")
    gc.callbacks.remove(collections)
    print(f"garbage collections during the run (generation: count, ms): {collections.summary()}")
    t0 = time.perf_counter()
    gc.collect()  # the engine is idle: a full collection over every object, as one in the loop would be
    print(
        f"a full collection now: {(time.perf_counter() - t0) * 1e3:.0f} ms over {len(gc.get_objects())} objects"
    )
    if engine.guided is not None:
        filled = engine.guided.rows_filled
        print(
            f"guided: {guided_requests} requests, finish reasons {dict(reasons)}; {filled} mask rows "
            f"({filled / steps:.0f} per step)"
        )

        def line(label: str, seconds: float) -> None:
            print(
                f"  {label:<44} {seconds / steps * 1e3:7.3f} ms/step {seconds / max(1, filled) * 1e6:6.2f} us/row"
            )

        guided = engine.guided
        guided.wait()
        print("  on the loop's thread:")
        line("constrained rows of a step (_guided_rows)", s["rows"])
        line("matcher advance (_advance_matchers)", s["advance"])
        line("  of which the library's batch accept", guided.accept_s)
        line("host-mask buffer (token_masks)", s["host_masks"])
        line("fill hand-off to the decoder's thread", s["start_fill"])
        line("wait for the fill + sample launch", s["launch_sampling"] - s["stub"])
        main_thread = (
            s["advance"] + s["rows"] + s["host_masks"] + s["start_fill"] + s["launch_sampling"] - s["stub"]
        )
        line("all guided work on the loop's thread", main_thread)
        print("  on the decoder's thread:")
        line("mask fill (library)", guided.fill_s)
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
