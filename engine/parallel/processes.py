"""Rank 0's spawned follower processes: start them, wait for their start-up reports, stop them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any

import torch.multiprocessing as mp


@dataclass
class Followers:
    """The follower processes, with a pipe each for start-up reports."""

    procs: list[Any]
    conns: list[Connection]

    @classmethod
    def spawn(cls, target: Callable[..., None], world_size: int, *args: Any) -> Followers:
        """Start ranks 1..world_size-1 as ``target(rank, *args, conn)`` (spawn start method)."""
        ctx = mp.get_context("spawn")
        procs, conns = [], []
        for rank in range(1, world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=target, args=(rank, *args, child_end), name=f"batchgen-tp-rank{rank}", daemon=True
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
