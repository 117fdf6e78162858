"""Shared pieces of the job-layer tests: config composition, a fast fake engine, output readers, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from hydra import compose, initialize_config_dir

from engine.outputs import CompletionOutput, RequestError
from engine.sampling_params import SamplingParams
from engine.timing import RunSummary, StepRecord
from jobs.cli import register_configs, to_run_config
from jobs.config import RunConfig
from jobs.pipeline.manifest import GENERATIONS_DIR, MANIFEST_NAME, Manifest, read_stream

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
PROMPTS = ROOT / "jobs" / "assets" / "prompts.jsonl"


def compose_config(overrides: list[str]) -> RunConfig:
    """The typed RunConfig that ``python run.py <overrides>`` would run."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return to_run_config(cfg)


def read_rows(out_dir: Path) -> list[dict]:
    """All rows of the shards the manifest lists."""
    manifest = Manifest.load(out_dir / MANIFEST_NAME)
    tables = [read_stream(out_dir / GENERATIONS_DIR / s.file) for s in manifest.chunks]
    return pa.concat_tables(tables).to_pylist() if tables else []


def rows_by_custom_id(rows: list[dict]) -> dict[str, dict]:
    """Rows keyed by custom_id, asserting that no custom_id appears twice."""
    out = {}
    for r in rows:
        assert r["custom_id"] not in out, f"duplicate row {r['custom_id']}"
        out[r["custom_id"]] = r
    return out


def generated_part(row: dict) -> tuple:
    """What must be identical between an interrupted-and-resumed run and an uninterrupted one."""
    return (row["completion"], tuple(row["token_ids"]), row["finish_reason"], row["error"], row["logprobs"])


def single_run_rows(root: Path, models_dir: Path, settings: list[str]) -> dict[str, dict]:
    """Rows of one unsplit run of ``settings`` under ``root`` (torch on one thread), keyed by custom_id."""
    import torch

    from jobs.generate import output_dir, run_generation

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose_config([*settings, f"output_root={root}", f"models_dir={models_dir}", "shard=single"])
        run_generation(cfg)
    finally:
        torch.set_num_threads(before)
    return rows_by_custom_id(read_rows(output_dir(cfg)))


def run_cli(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """``python run.py <args>`` from the repository root, offline, without a progress bar."""
    return subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def cli_env() -> dict[str, str]:
    """Environment of the CLI subprocesses: offline, one thread (2-core CI machines)."""
    return os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class ByteTokenizer:
    """A trivial tokenizer (one token per UTF-8 byte) for tests where tokenizing speed matters."""

    chat_template = "fake"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i % 256 for i in ids).decode(errors="replace")

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )


@dataclass
class _FakeSeq:
    request_id: str
    index: int
    prompt: list[int]
    params: SamplingParams
    tokens: list[int]
    produced: int = 0


@dataclass
class FakeStats:
    """The fields of engine.stats() the job layer reads."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int


@dataclass
class FakeEngine:
    """A deterministic stand-in for ``LLMEngine``: each sample's tokens derive from (seed, request id, index).

    It schedules up to ``max_num_seqs`` samples per step, one token each, so samples finish out of
    order; ``unfinished_log`` records ``num_unfinished()`` before each step.
    """

    tokenizer: object
    max_num_seqs: int = 8
    max_model_len: int = 512
    seed: int = 0
    vocab: int = 2048
    record_unfinished: bool = True
    unfinished_log: list[int] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    record_added: bool = True
    steps: int = 0
    on_step: object = None
    _waiting: deque = field(default_factory=deque)
    _running: list = field(default_factory=list)
    _records: list = field(default_factory=list)
    _live: dict = field(default_factory=dict)

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self._live:
            raise RequestError(f"duplicate request id {request_id!r}")
        if not prompt:
            raise RequestError("empty prompt")
        if len(prompt) + params.max_new_tokens > self.max_model_len:
            raise RequestError(
                f"prompt of {len(prompt)} tokens exceeds the model's context length {self.max_model_len}"
            )
        self._live[request_id] = params.n
        if self.record_added:
            self.added.append(request_id)
        for i in range(params.n):
            seed = self.seed if params.seed is None else params.seed
            h = hashlib.blake2b(
                f"{seed}/{request_id}/{i}/{params.temperature}".encode(), digest_size=16
            ).digest()
            length = 1 + h[0] % params.max_new_tokens
            tokens = [3 + (h[j % 16] * 31 + j) % (self.vocab - 3) for j in range(length)]
            self._waiting.append(_FakeSeq(request_id, i, prompt, params, tokens))

    def step(self) -> list[CompletionOutput]:
        if self.record_unfinished:
            self.unfinished_log.append(self.num_unfinished())
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self)
        while self._waiting and len(self._running) < self.max_num_seqs:
            self._running.append(self._waiting.popleft())
        finished, still = [], []
        for seq in self._running:
            seq.produced += 1
            (finished if seq.produced >= len(seq.tokens) else still).append(seq)
        self._running = still
        self._records.append(
            StepRecord(self.steps, 0.0, 0.0, 1e-4, 0.0, len(still) + len(finished), 0, 1, 1, 10, "sync")
        )
        outs = []
        for seq in finished:
            self._live[seq.request_id] -= 1
            if not self._live[seq.request_id]:
                del self._live[seq.request_id]
            lps = [-((t % 7) / 3.0) for t in seq.tokens] if seq.params.logprobs else None
            reason = "stop" if seq.tokens[-1] % 5 == 0 else "length"
            text = self.tokenizer.decode(seq.tokens)
            outs.append(
                CompletionOutput(seq.request_id, seq.index, seq.prompt, seq.tokens, text, reason, lps)
            )
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    def num_unfinished(self) -> int:
        return len(self._waiting) + len(self._running)

    def stats(self) -> FakeStats:
        return FakeStats(len(self._running), len(self._waiting), len(self._running), 100)

    def pop_step_records(self) -> list[StepRecord]:
        records, self._records = self._records, []
        return records

    def summary(self) -> RunSummary:
        return RunSummary(self.steps, 1.0, 0.5, 0.0, 0, self.steps)


def fake_factory(tokenizer: object = None, **kwargs) -> tuple[list[FakeEngine], object]:
    """An engine factory for ``run_generation`` and the list of engines it made."""
    made: list[FakeEngine] = []

    def make(cfg: RunConfig) -> FakeEngine:
        engine = FakeEngine(tokenizer or ByteTokenizer(), **kwargs)
        made.append(engine)
        return engine

    return made, make


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON Lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
