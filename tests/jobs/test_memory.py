"""A 200k-row dataset streams through the source, prompt and writer layers with bounded memory."""

from __future__ import annotations

import re
import tracemalloc
from collections import deque
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.outputs import CompletionOutput
from engine.sampling_params import SamplingParams
from engine.timing import RunSummary, StepRecord
from jobs.generate import output_dir, run_generation
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs_helpers import ByteTokenizer, FakeStats, compose_config

ROWS = 200_000
PROMPT_CHARS = 200
# Stated bounds for the whole run (source -> prompts -> StreamingEngine -> Arrow shards + manifest):
HEAP_PEAK_BOUND = 48 << 20  # Python allocations (tracemalloc peak); the dataset itself is ~40 MB of text
ID_BYTES = 160
"""The one cost that grows with the rows: each distinct id of the shard is kept (duplicate-id check, docs/jobs.md)."""
RSS_GROWTH_BOUND = 96 << 20  # resident memory growth of the process, Arrow buffers included


class StreamingEngine:
    """An engine that finishes every sample in the step after its admission with the same three tokens.

    The measured layers are the job's (source, prompts, writer): this engine allocates next to nothing
    per request, so that the time under tracemalloc goes to them (``jobs_helpers.FakeEngine``'s hashing
    and per-step bookkeeping doubled the test's duration).
    """

    TOKENS = [104, 105, 33]

    def __init__(self, max_num_seqs: int) -> None:
        self.tokenizer = ByteTokenizer()
        self.max_num_seqs = max_num_seqs
        self.steps = 0
        self._waiting: deque[tuple[str, int, list[int]]] = deque()
        self._records: list[StepRecord] = []

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self._waiting.extend((request_id, i, prompt) for i in range(params.n))

    def step(self) -> list[CompletionOutput]:
        self.steps += 1
        batch = [self._waiting.popleft() for _ in range(min(self.max_num_seqs, len(self._waiting)))]
        self._records.append(StepRecord(self.steps, 0.0, 0.0, 1e-4, 0.0, len(batch), 0, 1, 1, 10, "sync"))
        return [CompletionOutput(rid, i, prompt, self.TOKENS, "hi!", "length") for rid, i, prompt in batch]

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting)

    def num_unfinished(self) -> int:
        return len(self._waiting)

    def stats(self) -> FakeStats:
        return FakeStats(0, len(self._waiting), 0, 100)

    def pop_step_records(self) -> list[StepRecord]:
        records, self._records = self._records, []
        return records

    def summary(self) -> RunSummary:
        return RunSummary(self.steps, 1.0, 0.5, 0.0, 0, self.steps)


def make_dataset(path: Path, rows: int) -> Path:
    filler = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor " * 4
    prompts = [f"row {i}: {filler[i % 50 : i % 50 + PROMPT_CHARS]}" for i in range(rows)]
    table = pa.table({"uid": [f"u{i:07d}" for i in range(rows)], "text": prompts})
    pq.write_table(table, path, row_group_size=10_000)
    return path


def peak_rss_kib() -> tuple[int, int] | None:
    """(peak, current) resident KiB of this process since the last reset, or None where Linux /proc is absent."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    hwm, rss = (int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmHWM", "VmRSS"))
    return hwm, rss


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_measured(tmp_path: Path, rows: int) -> tuple[int, int | None, float]:
    data = make_dataset(tmp_path / f"data-{rows}.parquet", rows)
    cfg = compose_config(
        [
            f"output_root={tmp_path}",
            f"run_name=mem-{rows}",
            "runner.progress=false",
            "data.format=parquet",
            f"data.path={data}",
            "data.prompt_column=text",
            "data.id_column=uid",
            "job.prompt.chat_template=false",
            "job.sampling.n=1",
            "job.sampling.max_new_tokens=3",
            "engine.max_num_seqs=256",
            "checkpoint.rows=4096",
        ]
    )
    can_reset = reset_peak_rss()
    rss_before = peak_rss_kib()
    tracemalloc.start()
    stats = run_generation(cfg, make_engine=lambda cfg: StreamingEngine(max_num_seqs=256))
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = peak_rss_kib()
    rss_growth = (rss_after[0] - rss_before[1]) * 1024 if can_reset and rss_before and rss_after else None
    assert stats.complete and stats.output_rows == rows
    assert Manifest.load(output_dir(cfg) / MANIFEST_NAME).rows == rows
    return heap_peak, rss_growth, stats.wall_s


def test_200k_rows_stream_through_with_bounded_memory(tmp_path):
    small_heap, _, _ = run_measured(tmp_path, ROWS // 10)
    heap, rss_growth, wall = run_measured(tmp_path, ROWS)
    print(f"\n200k rows: heap peak {heap / 2**20:.1f} MiB (20k rows: {small_heap / 2**20:.1f} MiB), ", end="")
    print(f"RSS growth {rss_growth and rss_growth / 2**20:.1f} MiB, {wall:.1f} s")
    assert heap < HEAP_PEAK_BOUND
    extra_ids = ROWS - ROWS // 10
    assert heap < 1.25 * small_heap + (2 << 20) + ID_BYTES * extra_ids, (
        "memory must not grow with the dataset's size beyond the ids kept for the duplicate check"
    )
    if rss_growth is not None:
        assert rss_growth < RSS_GROWTH_BOUND
