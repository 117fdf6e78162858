"""Start a tensor-parallel group and return rank 0's worker, whose runner drives every rank.

- **spawned** (the default): one process starts N-1 follower processes (``torch.multiprocessing``,
  spawn) on GPUs 1..N-1 and is rank 0 on GPU 0.
- **torchrun**: with ``WORLD_SIZE`` > 1 in the environment, each process is one rank (GPU
  ``LOCAL_RANK``); the call returns on rank 0, and on the other ranks it serves rank 0 and then
  exits the process.
"""

from __future__ import annotations

import atexit

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.model.loader import resolve_device
from engine.model.slicing import check_tp_support
from engine.parallel.follower import build_worker, follower_main, serve
from engine.parallel.group import TPContext, spawned_rank, torchrun_env, torchrun_rank
from engine.parallel.processes import Followers
from engine.parallel.runner import TPModelRunner
from engine.parallel.source import ModelSource
from engine.worker import Worker


def start_worker(source: ModelSource, cfg: EngineConfig) -> Worker:
    """Start the group of ``cfg.tensor_parallel_size`` ranks; returns rank 0's worker (its runner
    sends each step to the others, and closing it stops them)."""
    world = cfg.tensor_parallel_size
    check_tp_support(source.resolve_config(), world)
    env = torchrun_env()
    if env is not None:
        rank, env_world, local_rank = env
        if env_world != world:
            raise ValueError(
                f"torchrun started {env_world} processes but tensor_parallel_size is {world}: "
                f"run torchrun --nproc-per-node {world}"
            )
        ctx = torchrun_rank(rank, world, local_rank, cfg)
        worker = build_worker(source, cfg, ctx)
        if rank != 0:
            serve(worker, ctx)
            raise SystemExit(0)
        return _lead(worker, ctx)
    if resolve_device(cfg.device).type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(
            f"tensor_parallel_size={world} needs {world} GPUs; {torch.cuda.device_count()} are visible"
        )
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    followers = Followers.spawn(follower_main, world, store.port, source.for_followers(), cfg)
    try:
        followers.wait("started")
        ctx = spawned_rank(0, world, store, cfg, followers=followers)
        worker = build_worker(source, cfg, ctx)
        ctx.sync_point("ready")
    except BaseException:
        followers.join(0.0)
        raise
    return _lead(worker, ctx)


def _lead(worker: Worker, ctx: TPContext) -> Worker:
    """Rank 0: its runner sends each step first; closing the worker stops the group."""
    worker.runner = TPModelRunner(worker.runner, ctx)
    worker.tp = ctx
    worker.close_hooks.append(ctx.close)
    atexit.register(ctx.close)
    return worker
