"""The progress bar over source rows and the final summary line."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

from tqdm import tqdm


@dataclass
class RunStats:
    """Counts of one attempt of a run (rows already committed by earlier attempts are ``skipped_rows``)."""

    source_rows: int = 0
    output_rows: int = 0
    error_rows: int = 0
    skipped_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    gpu_busy: float | None = None
    device: str | None = None  # the engine's device type ("cuda", "cpu"); busy is a GPU's only on "cuda"
    complete: bool = False

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        """One line: rows, tokens, wall time, tokens/s, and how busy the device was (GPU busy on CUDA)."""
        busy = "n/a" if self.gpu_busy is None else f"{100 * self.gpu_busy:.1f}%"
        label = "GPU busy" if self.device == "cuda" else "device busy"
        return (
            f"{self.source_rows} source rows -> {self.output_rows} rows ({self.error_rows} errors, "
            f"{self.skipped_rows} already committed) | {self.completion_tokens} tokens generated, "
            f"{self.prompt_tokens} prompt tokens | {self.wall_s:.1f} s | {self.tokens_per_s:.1f} tok/s | "
            f"{label} {busy}"
        )


class Progress:
    """A tqdm bar over source rows (total when known) with tokens/s, running requests and KV cache use."""

    def __init__(self, total: int | None, enabled: bool, refresh_s: float = 0.5) -> None:
        self.bar = tqdm(total=total, unit="row", disable=not enabled, dynamic_ncols=True, file=sys.stderr)
        self.refresh_s = refresh_s
        self._start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()  # rows skipped on resume are counted by the request prefetch thread

    def advance(self, rows: int) -> None:
        """Count finished (or skipped) source rows."""
        if rows:
            with self._lock:
                self.bar.update(rows)

    def due(self) -> bool:
        """Whether the engine figures should be refreshed now (throttled)."""
        now = time.monotonic()
        if self.bar.disable or now - self._last < self.refresh_s:
            return False
        self._last = now
        return True

    def show(self, generated_tokens: int, running: int, kv_used: int, kv_total: int) -> None:
        """Update the bar's postfix with the engine's state."""
        rate = generated_tokens / max(time.monotonic() - self._start, 1e-9)
        kv = 100 * kv_used / kv_total if kv_total else 0.0
        self.bar.set_postfix_str(f"{rate:.1f} tok/s, running {running}, KV {kv:.1f}%", refresh=False)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
