"""A 200k-row dataset streams through the source, prompt and writer layers with bounded memory."""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.generate import output_dir, run_generation
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs_helpers import compose_config, fake_factory

ROWS = 200_000
PROMPT_CHARS = 200
# Stated bounds for the whole run (source -> prompts -> fake engine -> Arrow shards + manifest):
HEAP_PEAK_BOUND = 48 << 20  # Python allocations (tracemalloc peak); the dataset itself is ~40 MB of text
ID_BYTES = 160
"""The one cost that grows with the rows: each distinct id of the shard is kept (duplicate-id check, docs/jobs.md)."""
RSS_GROWTH_BOUND = 96 << 20  # resident memory growth of the process, Arrow buffers included


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
    _, make = fake_factory(max_num_seqs=256, record_unfinished=False, record_added=False)
    can_reset = reset_peak_rss()
    rss_before = peak_rss_kib()
    tracemalloc.start()
    stats = run_generation(cfg, make_engine=make)
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
