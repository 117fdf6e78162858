"""Per-step timing records and the run summary built from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class StepRecord:
    """What one engine step did and how long it took.

    ``gpu_compute_s`` is measured with events on the compute stream on CUDA, and equals the
    forward + sample wall time on CPU. ``gpu_idle_s`` is the gap between the end of the previous
    step's compute and the start of this one's.
    """

    step: int
    start_time: float
    cpu_prep_s: float
    gpu_compute_s: float
    gpu_idle_s: float
    num_seqs: int
    prefill_tokens: int
    decode_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    mode: str
    preempted: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunSummary:
    """Totals over a run's steps. ``gpu_busy`` = total compute time / wall time."""

    steps: int
    wall_s: float
    compute_s: float
    idle_s: float
    prefill_tokens: int
    decode_tokens: int

    @property
    def gpu_busy(self) -> float:
        return self.compute_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class StepTotals:
    """Running sums over step records (a run can have millions of steps: nothing is kept per step)."""

    steps: int = 0
    compute_s: float = 0.0
    idle_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0

    def add(self, r: StepRecord) -> None:
        self.steps += 1
        self.compute_s += r.gpu_compute_s
        self.idle_s += r.gpu_idle_s
        self.prefill_tokens += r.prefill_tokens
        self.decode_tokens += r.decode_tokens

    def summary(self, wall_s: float) -> RunSummary:
        return RunSummary(
            self.steps, wall_s, self.compute_s, self.idle_s, self.prefill_tokens, self.decode_tokens
        )
