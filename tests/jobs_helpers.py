"""Shared pieces of the job-layer tests: config composition, a fast fake engine, output readers, the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
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


class PreloadedRun:
    """A ``python run.py`` process forked by ``PreloadedCli``: what the tests use of ``subprocess.Popen``."""

    def __init__(self, cli: PreloadedCli, pid: int, out: Path, err: Path) -> None:
        self._cli = cli
        self.pid = pid
        self._out, self._err = out, err

    @property
    def returncode(self) -> int | None:
        return self._cli.exits.get(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self._cli.changed:
            if not self._cli.changed.wait_for(lambda: self.pid in self._cli.exits or self._cli.dead, timeout):
                raise subprocess.TimeoutExpired(f"run.py (pid {self.pid})", timeout)
        if self.returncode is None:
            raise RuntimeError(f"{FORKER} exited before run.py (pid {self.pid})")
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._out.read_text(errors="replace"), self._err.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


FORKER = Path(__file__).with_name("cli_forker.py")


class PreloadedCli:
    """Starts ``python run.py <args>`` processes without their interpreter start-up and imports.

    A run of the tiny model spends most of its few seconds of CPU importing torch and transformers.
    ``cli_forker.py`` imports them once, in a process that runs nothing else, and forks a child per
    run: a new process that runs run.py as ``__main__`` with its own arguments and environment, exit
    status and signals as a ``python run.py`` subprocess. Only environment variables read when used
    (``BATCHGEN_FAULTS``) may differ from ``cli_env()``: the modules were imported under it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.exits: dict[int, int] = {}
        self.changed = threading.Condition()
        self.dead = False
        self._started: dict[int, int] = {}
        self._pids: list[int] = []
        self._count = 0
        self._proc = subprocess.Popen(
            [sys.executable, str(FORKER)],
            cwd=ROOT,
            env=cli_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, name="cli-forker", daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            what, *values = line.split()
            with self.changed:
                if what == "started":
                    self._started[int(values[0])] = int(values[1])
                else:
                    self.exits[int(values[0])] = int(values[1])
                self.changed.notify_all()
        with self.changed:
            self.dead = True
            self.changed.notify_all()

    def start(
        self, args: list[str], env: dict[str, str] | None = None, module: str | None = None
    ) -> PreloadedRun:
        """``python run.py <args>`` (``python -m <module> <args>``) with ``cli_env()`` and ``env``, stdin
        empty, stdout and stderr kept."""
        assert self._proc.stdin is not None
        with self.changed:
            self._count += 1
            request_id = self._count
        out, err = (self.folder / f"run-{request_id}.{name}" for name in ("out", "err"))
        request = {
            "id": request_id,
            "args": args,
            "module": module,
            "env": cli_env() | (env or {}),
            "out": str(out),
            "err": str(err),
        }
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        with self.changed:
            if not self.changed.wait_for(lambda: request_id in self._started or self.dead, 120):
                raise RuntimeError(f"{FORKER} did not start {module or 'run.py'} {' '.join(args)}")
            if request_id not in self._started:
                raise RuntimeError(f"{FORKER} exited (status {self._proc.poll()})")
            pid = self._started.pop(request_id)
            self._pids.append(pid)
            return PreloadedRun(self, pid, out, err)

    def run(
        self,
        args: list[str],
        timeout: float = 120,
        env: dict[str, str] | None = None,
        module: str | None = None,
    ) -> subprocess.CompletedProcess:
        """``run_cli``'s result, from a forked run."""
        proc = self.start(args, env, module)
        try:
            out, err = proc.communicate(timeout)
        finally:
            proc.kill()
        return subprocess.CompletedProcess([module or "run.py", *args], proc.returncode, out, err)

    def close(self) -> None:
        """Stop any run still going on, then the forking process."""
        for pid in set(self._pids) - self.exits.keys():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._proc.kill()
        self._proc.communicate()


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
