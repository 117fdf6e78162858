"""CPU cost of one engine step without the model: W2-shaped requests, forward pass replaced by a stub.

Measures what the async loop must hide behind the GPU's step time: scheduling, building the
step's inputs, loading an I/O slot and processing the sampled tokens.
Usage: python -m bench.scripts.engine_cpu_overhead
"""

import random
import time

from transformers import LlamaConfig

from engine import EngineConfig, LLMEngine, SamplingParams, build_random_model
from engine.runner.model_runner import Launched


def main() -> None:
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
            SamplingParams(temperature=0, max_new_tokens=rng.randint(64, 512), ignore_eos=True),
        )
    steps, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    print(f"{steps} steps, {(time.perf_counter() - start) / steps * 1000:.2f} ms of CPU per step")


if __name__ == "__main__":
    main()
