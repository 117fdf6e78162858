"""A follower rank: build its worker, then launch each step rank 0 sends until told to stop."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.model.loader import resolve_device
from engine.parallel.group import TPContext, spawned_rank
from engine.parallel.source import ModelSource
from engine.worker import Worker


def build_worker(source: ModelSource, cfg: EngineConfig, ctx: TPContext) -> Worker:
    """This rank's worker over its slice of the model, with the block count all ranks agree on."""
    return Worker(
        source.build(ctx), cfg, kv_head_groups=ctx.world_size, agree_num_blocks=ctx.agree_num_blocks
    )


def serve(worker: Worker, ctx: TPContext) -> None:
    """A follower's loop: launch each step rank 0 sends, until its stop message."""
    assert ctx.rank != 0
    try:
        while (arrays := ctx.channel.recv()) is not None:
            worker.runner.launch(arrays)
        if worker.device.type == "cuda":
            torch.cuda.synchronize(worker.device)
    finally:
        worker.close()
        ctx.close()


def follower_main(rank: int, port: int, source: ModelSource, cfg: EngineConfig, conn: Connection) -> None:
    """A spawned follower: report each start-up stage to rank 0, then serve until told to stop.

    It ignores stop signals (rank 0 decides when it stops) and exits when rank 0's process is gone.
    """
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
    parent = _exit_with_parent()
    world = cfg.tensor_parallel_size
    try:
        conn.send(("ok", "started"))
        if resolve_device(cfg.device).type == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads() // world))
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
        ctx = spawned_rank(rank, world, store, cfg, conn=conn)
        worker = build_worker(source, cfg, ctx)
        ctx.sync_point("ready")
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None
    try:
        serve(worker, ctx)
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
