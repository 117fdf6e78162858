"""CUDA kernel time of W1 decode steps by kernel (eager, sync mode), to see where a step's time goes.

Usage (on a GPU machine): python -m bench.scripts.profile_decode_step
"""

import torch
from torch.profiler import ProfilerActivity, profile

from bench.workloads import WORKLOADS
from engine import EngineConfig, LLMEngine, SamplingParams, build_random_model


def main() -> None:
    workload = WORKLOADS["w1"]
    model = build_random_model(workload.model_config(), "bfloat16", "cuda")
    engine = LLMEngine(model, None, EngineConfig(mode="sync", cuda_graphs=False, max_num_seqs=32))
    for i, (prompt, _) in enumerate(workload.requests()):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True))
    for _ in range(100):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
