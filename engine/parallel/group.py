"""One rank's view of a tensor-parallel group: its device, the model's process group and the step channel.

The ranks come from one of two places: **spawned** by rank 0 (its own process groups over rank
0's store, torch.distributed's default group left alone so one process can hold several
engines), or **torchrun** (each process one rank; the default group).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.model.loader import resolve_device
from engine.parallel.channel import StepChannel
from engine.parallel.processes import Followers
from engine.runner.step_layout import StepArrays

GROUP_TIMEOUT = timedelta(minutes=10)
"""Collectives (the start-up rendezvous included) fail after this; a follower waits for the next step longer."""
STOP_TIMEOUT_S = 60.0


@dataclass
class TPContext:
    """One rank's view of the tensor-parallel group."""

    rank: int
    world_size: int
    device: torch.device
    group: Any  # the model's all-reduces: NCCL on CUDA, gloo on CPU (a process group or backend object)
    channel: StepChannel  # step inputs from rank 0 (gloo)
    owns_default_group: bool = False  # torchrun: this engine initialised torch.distributed
    followers: Followers | None = None  # rank 0 of a spawned group
    conn: Connection | None = None  # a spawned follower's pipe to rank 0
    store: Any = None
    closed: bool = field(default=False)

    def sync_point(self, stage: str) -> None:
        """Spawned groups: followers report ``stage`` and rank 0 waits for all (a failed follower
        becomes an error on rank 0 instead of a hang in the next collective)."""
        if self.conn is not None:
            self.conn.send(("ok", stage))
        elif self.followers is not None:
            self.followers.wait(stage)

    def agree_num_blocks(self, local: int) -> int:
        """The smallest KV block count of all ranks (each sized its cache from its own free memory)."""
        self.sync_point("sized")
        count = torch.tensor([local], dtype=torch.int64, device=self.device)
        self.group.allreduce([count], dist.ReduceOp.MIN).wait()
        return int(count.item())

    def send_step(self, arrays: StepArrays) -> None:
        if self.followers is not None:
            self.followers.check()
        self.channel.send(arrays)

    def close(self) -> None:
        """Rank 0: tell the followers to stop and wait for them. Every rank: leave the groups."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        if self.rank == 0:
            with contextlib.suppress(Exception):  # a follower already gone: nothing to stop
                self.channel.send_stop()
            if self.followers is not None:
                self.followers.join(STOP_TIMEOUT_S)
        if self.owns_default_group and dist.is_initialized():
            dist.destroy_process_group()
        elif self.store is not None:  # spawned: the groups are this engine's own
            for group in (self.group, self.channel.group):
                with contextlib.suppress(Exception):
                    group.shutdown()


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process is one of several started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def rank_device(cfg: EngineConfig, local_rank: int) -> torch.device:
    if resolve_device(cfg.device).type != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def spawned_rank(rank: int, world: int, store: Any, cfg: EngineConfig, **extra: Any) -> TPContext:
    """A rank of a spawned group: its own process groups over rank 0's store."""
    device = rank_device(cfg, rank)
    steps = dist.ProcessGroupGloo(dist.PrefixStore("steps", store), rank, world, GROUP_TIMEOUT)
    model_store = dist.PrefixStore("model", store)
    if device.type == "cuda":
        group = dist.ProcessGroupNCCL(model_store, rank, world)
    else:
        group = dist.ProcessGroupGloo(model_store, rank, world, GROUP_TIMEOUT)
    return TPContext(rank, world, device, group, StepChannel(steps), store=store, **extra)


def torchrun_rank(rank: int, world: int, local_rank: int, cfg: EngineConfig) -> TPContext:
    """A torchrun rank: the default group (initialised here from MASTER_ADDR / MASTER_PORT unless it is already)."""
    device = rank_device(cfg, local_rank)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    elif dist.get_world_size() != world:
        raise ValueError(
            f"the initialised process group has {dist.get_world_size()} ranks; tensor_parallel_size is {world}"
        )
    steps = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
    return TPContext(rank, world, device, dist.group.WORLD, StepChannel(steps), owns_default_group=owns)
