"""CPU cost of one engine step without the model: W2-shaped requests, forward pass replaced by a stub.

Measures what the async loop must hide behind the GPU's step time: scheduling, building the
step's inputs, loading an I/O slot and processing the sampled tokens; and, within that, the
prefix-cache keys (SHA-256 of each full block, ``engine.block_manager.block_hash``).
Usage: python -m bench.scripts.engine_cpu_overhead [--temperature 1 --top-p 0.95] [--profile]
"""

import argparse
import cProfile
import pstats
import random
import time

from transformers import LlamaConfig

from engine import EngineConfig, LLMEngine, SamplingParams, build_random_model
from engine import block_manager as block_manager_module
from engine.runner.model_runner import Launched


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--profile", action="store_true", help="print the functions that take the time")
    args = parser.parse_args(argv)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=512,
        max_position_embeddings=2048,
    )
    engine = LLMEngine(
        build_random_model(cfg, "float32", "cpu"),
        None,
        EngineConfig(max_num_seqs=256, max_batch_tokens=2048, num_blocks=40000, mode="async"),
    )
    runner = engine.runner

    def launch(a):
        index = runner._next_slot
        runner._next_slot ^= 1
        runner.slots[index].load(a, a.num_tokens, a.num_seqs, a.num_sampled)
        return Launched(index, a.num_sampled)

    runner.launch = launch
    runner.collect = lambda launched: ([7] * launched.num_rows, [0.0] * launched.num_rows, 0.0, 1.0)
    rng = random.Random(0)
    for i in range(1024):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(64, 512))]
        engine.add_request(
            str(i),
            prompt,
            SamplingParams(
                temperature=args.temperature,
                top_p=args.top_p,
                seed=i,
                max_new_tokens=rng.randint(64, 512),
                ignore_eos=True,
            ),
        )
    timed = TimedBlockHash()
    block_manager_module.block_hash = timed  # the module function the engine's BlockManager calls
    scheduled = []  # each step's batch: (tokens, decode tokens)
    schedule = engine.scheduler.schedule

    def schedule_and_note():
        batch = schedule()
        scheduled.append((batch.num_tokens, batch.decode_tokens))
        return batch

    engine.scheduler.schedule = schedule_and_note
    profiler = cProfile.Profile() if args.profile else None
    steps, start, step_times = 0, time.perf_counter(), []
    if profiler:
        profiler.enable()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t0)
        steps += 1
    if profiler:
        profiler.disable()
    per_step = (time.perf_counter() - start) / steps
    print(f"{steps} steps, {per_step * 1000:.2f} ms of CPU per step")
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
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
