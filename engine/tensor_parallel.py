"""Tensor parallelism: start the ranks, build each rank's shard of the model, and serve the followers.

One scheduler: rank 0 owns the requests, the scheduler and the outputs (it is the ``LLMEngine``
the caller gets). Every step, before launching it, rank 0 broadcasts the step's inputs
(``tp_channel``); each other rank (a *follower*) runs a loop that receives them and launches the
same step on its own shard, until rank 0 sends a stop message. All ranks compute the same logits
(the row-parallel all-reduces give every rank the same sums), so every rank samples the same
tokens and keeps its own on-device carry-over; only rank 0 reads tokens back.

The ranks come from one of two places:

- **spawned** (the default): ``LLM(..., tensor_parallel_size=N)`` or ``LLMEngine.from_config``
  in one process starts N-1 follower processes (``torch.multiprocessing``, spawn) on GPUs
  1..N-1 and is rank 0 on GPU 0. The followers ignore stop signals (rank 0 decides when they
  stop) and exit when rank 0's process is gone.
- **torchrun**: with ``WORLD_SIZE`` > 1 in the environment, each process is one rank (GPU
  ``LOCAL_RANK``); the call returns the engine on rank 0, and on the other ranks it serves rank
  0 and then exits the process.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from .config import EngineConfig, ModelConfig
from .llm_engine import LLMEngine
from .model_loader import (
    build_random_model,
    load_model,
    load_tokenizer,
    prepare_model,
    resolve_device,
    resolve_dtype,
)
from .step_inputs import StepArrays
from .tp_channel import StepChannel
from .tp_load import lean_shard
from .tp_shard import check_tp_support, shard_model

GROUP_TIMEOUT = timedelta(minutes=10)
"""Collectives (the start-up rendezvous included) fail after this; a follower waits for the next step longer."""
STOP_TIMEOUT_S = 60.0


@dataclass
class ModelSource:
    """What each rank builds its shard from: a checkpoint, a config (random weights from ``seed``),
    a config with a state dict (a model object's weights, for spawned ranks), or the model object
    itself (rank 0 and torchrun ranks, sharded in place)."""

    model_cfg: ModelConfig | None = None
    config: PretrainedConfig | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    model: PreTrainedModel | None = None
    dtype: Any = "auto"
    seed: int = 0

    def resolve_config(self) -> PretrainedConfig:
        if self.config is None:
            if self.model is not None:
                self.config = self.model.config
            else:
                assert self.model_cfg is not None
                m = self.model_cfg
                self.config = AutoConfig.from_pretrained(
                    m.model, revision=m.revision, trust_remote_code=m.trust_remote_code
                )
        return self.config

    def for_followers(self) -> ModelSource:
        """A picklable copy: a model object travels as its config and (CPU, shared-memory) weights."""
        if self.model is None:
            return self
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return ModelSource(config=self.model.config, state_dict=weights, dtype=self.model.dtype)

    def build(self, ctx: TPContext) -> PreTrainedModel:
        """This rank's shard of the model, on its device.

        A config and a local folder of safetensors files are built lean (``tp_load.lean_shard``:
        on ``meta``, sharded there, then only this rank's slices made or read on its device).
        Other checkpoints (``.bin`` files, hub ids) and configs of families whose init ``tp_load``
        does not know are loaded whole (checkpoints on CPU) and sliced; so is a model object.
        """
        if self.model is None and self.state_dict is None:
            m, config = self.model_cfg, self.resolve_config()
            dtype = resolve_dtype(m.dtype if m else self.dtype, config, ctx.device)
            path, remote = (m.model, m.trust_remote_code) if m else (None, False)
            model = lean_shard(
                config, dtype, ctx.device, ctx.rank, ctx.world_size, ctx.group, self.seed, path, remote
            )
            if model is not None:
                return prepare_model(model, ctx.device)
        cpu = torch.device("cpu")
        if self.model is not None:
            model = self.model
        elif self.model_cfg is not None:
            dtype = resolve_dtype(self.model_cfg.dtype, self.resolve_config(), ctx.device)
            model = load_model(dataclasses.replace(self.model_cfg, dtype=dtype), cpu)
        elif self.state_dict is not None:
            assert self.config is not None
            model = build_random_model(self.config, self.dtype, cpu, self.seed)
            model.load_state_dict(self.state_dict)
        else:
            assert self.config is not None
            model = build_random_model(self.config, self.dtype, ctx.device, self.seed)
        shard_model(model, ctx.rank, ctx.world_size, ctx.group)
        return prepare_model(model, ctx.device)


@dataclass
class Followers:
    """Rank 0's spawned follower processes, with a pipe each for start-up reports."""

    procs: list[Any]
    conns: list[Connection]

    @classmethod
    def spawn(cls, source: ModelSource, cfg: EngineConfig, port: int) -> Followers:
        ctx = mp.get_context("spawn")
        procs, conns = [], []
        for rank in range(1, cfg.tensor_parallel_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=_follower_main,
                args=(rank, port, source, cfg, child_end),
                name=f"batchgen-tp-rank{rank}",
                daemon=True,
            )
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        return cls(procs, conns)

    def wait(self, stage: str) -> None:
        """Block until every follower reports ``stage``; RuntimeError naming a follower that failed."""
        pending = set(range(len(self.procs)))
        while pending:
            wait_any([self.conns[i] for i in pending] + [self.procs[i].sentinel for i in pending], 1.0)
            for i in sorted(pending):
                try:
                    while self.conns[i].poll():
                        kind, message = self.conns[i].recv()
                        if kind == "error":
                            raise RuntimeError(f"tensor-parallel rank {i + 1} failed to start:\n{message}")
                        if message == stage:
                            pending.discard(i)
                            break
                except EOFError:
                    pass
                if i in pending and not self.procs[i].is_alive():
                    raise RuntimeError(
                        f"tensor-parallel rank {i + 1} exited (exit code {self.procs[i].exitcode}) "
                        f"before reporting {stage!r}"
                    )

    def check(self) -> None:
        """RuntimeError if a follower has exited."""
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} exited (exit code {proc.exitcode})")

    def join(self, timeout: float) -> None:
        """Wait for the followers to exit; kill those still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self.conns:
            conn.close()


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


def _rank_device(cfg: EngineConfig, local_rank: int) -> torch.device:
    if resolve_device(cfg.device).type != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _spawned_rank(rank: int, world: int, store: Any, cfg: EngineConfig, **extra: Any) -> TPContext:
    """A rank of a spawned group: its own process groups over rank 0's store (torch.distributed's
    default group is left alone, so one process can hold several engines)."""
    device = _rank_device(cfg, rank)
    steps = dist.ProcessGroupGloo(dist.PrefixStore("steps", store), rank, world, GROUP_TIMEOUT)
    model_store = dist.PrefixStore("model", store)
    if device.type == "cuda":
        group = dist.ProcessGroupNCCL(model_store, rank, world)
    else:
        group = dist.ProcessGroupGloo(model_store, rank, world, GROUP_TIMEOUT)
    return TPContext(rank, world, device, group, StepChannel(steps), store=store, **extra)


def _torchrun_rank(rank: int, world: int, local_rank: int, cfg: EngineConfig) -> TPContext:
    """A torchrun rank: the default group (initialised here from MASTER_ADDR / MASTER_PORT unless it is already)."""
    device = _rank_device(cfg, local_rank)
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


def start_engine(source: ModelSource, cfg: EngineConfig, tokenizer: Any = None) -> LLMEngine:
    """Start the tensor-parallel group of ``cfg.tensor_parallel_size`` ranks; returns rank 0's engine.

    Under torchrun the other ranks serve rank 0 here and then exit the process.
    """
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
        ctx = _torchrun_rank(rank, world, local_rank, cfg)
        engine = LLMEngine(source.build(ctx), tokenizer if rank == 0 else None, cfg, tp=ctx)
        if rank != 0:
            serve(engine)
            raise SystemExit(0)
        atexit.register(ctx.close)
        return engine
    if resolve_device(cfg.device).type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(
            f"tensor_parallel_size={world} needs {world} GPUs; {torch.cuda.device_count()} are visible"
        )
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    followers = Followers.spawn(source.for_followers(), cfg, store.port)
    try:
        followers.wait("started")
        ctx = _spawned_rank(0, world, store, cfg, followers=followers)
        engine = LLMEngine(source.build(ctx), tokenizer, cfg, tp=ctx)
        ctx.sync_point("ready")
    except BaseException:
        followers.join(0.0)
        raise
    atexit.register(ctx.close)
    return engine


def start_llm_engine(model: Any, tokenizer: Any, model_opts: dict[str, Any], cfg: EngineConfig) -> LLMEngine:
    """``LLM(model, tokenizer, **options)`` with ``tensor_parallel_size`` > 1."""
    if isinstance(model, str):
        model_cfg = ModelConfig(
            model=model, tokenizer=tokenizer if isinstance(tokenizer, str) else None, **model_opts
        )
        source = ModelSource(model_cfg=model_cfg)
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(model_cfg)
    elif isinstance(model, PretrainedConfig):
        source = ModelSource(config=model, dtype=model_opts.get("dtype", "auto"), seed=cfg.seed)
    else:
        source = ModelSource(model=model)
    return start_engine(source, cfg, tokenizer)


def serve(engine: LLMEngine) -> None:
    """A follower's loop: launch each step rank 0 sends, until its stop message."""
    ctx = engine.tp
    assert ctx is not None and ctx.rank != 0
    try:
        while (arrays := ctx.channel.recv()) is not None:
            engine.runner.launch(arrays)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
    finally:
        engine.close()


def _follower_main(rank: int, port: int, source: ModelSource, cfg: EngineConfig, conn: Connection) -> None:
    """A spawned follower: report each start-up stage to rank 0, then serve until told to stop."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
    parent = _exit_with_parent()
    world = cfg.tensor_parallel_size
    try:
        conn.send(("ok", "started"))
        if resolve_device(cfg.device).type == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads() // world))
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
        ctx = _spawned_rank(rank, world, store, cfg, conn=conn)
        engine = LLMEngine(source.build(ctx), None, cfg, tp=ctx)
        ctx.sync_point("ready")
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    try:
        serve(engine)
    except Exception:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # rank 0 died and broke the broadcast off: exit quietly
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.05)
        raise


def _exit_with_parent() -> int:
    """Exit at once when the parent process (rank 0) is gone, however it ended; returns its pid."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()
    return parent
