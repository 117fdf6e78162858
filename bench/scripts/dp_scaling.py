"""Data-parallel scaling of a workload: tok/s of one engine on one GPU, and of N engines, one per GPU.

    python -m bench.scripts.dp_scaling --gpus 8                 # W2 on GPU 0, then on GPUs 0..7
    python -m bench.scripts.dp_scaling --workload w1 --gpus 2 --mode sync
    python -m bench.scripts.dp_scaling --smoke                  # CPU: the smoke workload, 1 then 2 processes

Each engine runs in its own process (``CUDA_VISIBLE_DEVICES`` = its GPU) over a disjoint share of
the requests (request i goes to engine i % N), as ``data_parallel=N`` splits a job's rows. Each
builds its model (same shape and seed), warms up, then waits until all are ready, so they start
together; the N-engine throughput is all generated tokens over the time from the first start to
the last finish. Prints one line per run and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESULT = "DP_RESULT "


@dataclass(frozen=True)
class Share:
    """One engine's result: its generated tokens and its timed window (wall-clock seconds)."""

    tokens: int
    start: float
    end: float


def worker(workload_name: str, mode: str, index: int, count: int, barrier: Path) -> Share:
    """Engine ``index`` of ``count``: requests ``index::count`` of the workload, timed after all are ready."""
    import torch

    from bench.workloads import WORKLOADS, run_engine
    from engine import build_random_model

    workload = WORKLOADS[workload_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = build_random_model(workload.model_config(), dtype, device)
    started: list[float] = []

    def ready() -> None:
        (barrier / f"ready-{index}").touch()
        while len(list(barrier.glob("ready-*"))) < count:
            time.sleep(0.005)
        started.append(time.time())

    share = workload.requests()[index::count]
    r = run_engine(workload, model, mode, dtype=dtype, requests=share, ready=ready)
    return Share(r.generated_tokens, started[0], started[0] + r.wall_s)


def run(workload_name: str, mode: str, count: int, devices: list[str] | None) -> float:
    """Start ``count`` worker processes (one per entry of ``devices``, or on CPU); the total tok/s."""
    procs = []
    with tempfile.TemporaryDirectory(prefix="dp-scaling-") as barrier:
        for i in range(count):
            env = dict(os.environ)
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = devices[i]
            else:
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
            args = [
                sys.executable,
                "-m",
                "bench.scripts.dp_scaling",
                "--workload",
                workload_name,
                "--mode",
                mode,
            ]
            args += ["--worker", str(i), "--of", str(count), "--barrier", barrier]
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True))
        outputs = [p.communicate()[0] for p in procs]
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise SystemExit(
            f"dp_scaling: worker(s) {failed} failed (exit {[procs[i].returncode for i in failed]})"
        )
    shares = [
        Share(**json.loads(line[len(RESULT) :]))
        for out in outputs
        for line in out.splitlines()
        if line.startswith(RESULT)
    ]
    tokens = sum(s.tokens for s in shares)
    window = max(s.end for s in shares) - min(s.start for s in shares)
    skew = max(s.start for s in shares) - min(s.start for s in shares)
    tps = tokens / window
    where = f"{count} GPU(s)" if devices is not None else f"{count} CPU process(es)"
    print(
        f"{workload_name} {mode} on {where}: {tokens} tokens in {window:.2f} s = {tps:,.1f} tok/s "
        f"(per engine {', '.join(f'{s.tokens / (s.end - s.start):,.1f}' for s in shares)}; start skew "
        f"{1000 * skew:.1f} ms)",
        flush=True,
    )
    return tps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="w2")
    parser.add_argument("--mode", default="async", choices=["async", "sync"])
    parser.add_argument(
        "--gpus", type=int, default=None, help="engines for the scaled run (default: all GPUs)"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, the smoke workload, 2 processes")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--of", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        share = worker(args.workload, args.mode, args.worker, args.of, args.barrier)
        print(RESULT + json.dumps(share.__dict__), flush=True)
        return
    if args.smoke:
        workload, mode, count, devices = "smoke", "sync", 2, None
    else:
        from launch.data_parallel import visible_devices

        devices = visible_devices()
        count = args.gpus or len(devices)
        if not devices or count > len(devices) or count < 2:
            raise SystemExit(f"dp_scaling: --gpus {count} needs 2..{len(devices)} GPUs (visible: {devices})")
        workload, mode = args.workload, args.mode
    one = run(workload, mode, 1, devices[:1] if devices is not None else None)
    many = run(workload, mode, count, devices[:count] if devices is not None else None)
    print(f"scaling: {many / one:.2f}x with {count} engines (ideal {count}x)", flush=True)


if __name__ == "__main__":
    main()
