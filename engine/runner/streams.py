"""CUDA streams and events for the step pipeline, with no-op stand-ins on CPU.

On CPU every operation runs when it is issued, so the same pipeline code (two I/O slots,
carry-over, lagged output processing) runs unchanged and is testable without a GPU.
"""

from __future__ import annotations

import contextlib
import time

import torch


class HostEvent:
    """A CPU stand-in for ``torch.cuda.Event``: records wall time, never waits."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) * 1000.0


class HostStream:
    """A CPU stand-in for ``torch.cuda.Stream``."""

    def wait_event(self, event) -> None:
        pass


class Pipeline:
    """The three streams of the step pipeline (host-to-device, compute, device-to-host)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.h2d, self.compute, self.d2h = (torch.cuda.Stream(device) for _ in range(3))
        else:
            self.h2d = self.compute = self.d2h = HostStream()

    def event(self, timing: bool = False):
        # Blocking events make the CPU sleep in synchronize() instead of spinning on the driver.
        return torch.cuda.Event(enable_timing=timing, blocking=True) if self.cuda else HostEvent()

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()
