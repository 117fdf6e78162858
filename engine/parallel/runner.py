"""Rank 0's model runner under tensor parallelism: the loop calls it like the single-GPU one."""

from __future__ import annotations

import numpy as np

from engine.parallel.group import TPContext
from engine.runner.model_runner import Launched, ModelRunner
from engine.runner.step_layout import StepArrays


class TPModelRunner:
    """Sends each step to the other ranks, then launches it on rank 0's own slice of the model.

    All ranks compute the same logits (the row-parallel all-reduces give every rank the same
    sums), so every rank samples the same tokens (and computes the same top logprobs) and keeps its
    own carry-over; only rank 0 reads them back.
    """

    def __init__(self, runner: ModelRunner, ctx: TPContext) -> None:
        self.runner, self.ctx = runner, ctx
        self.kv_caches = runner.kv_caches
        self.use_graphs = runner.use_graphs

    def launch(self, arrays: StepArrays) -> Launched:
        self.ctx.send_step(arrays)
        return self.runner.launch(arrays)

    def collect(self, launched: Launched) -> tuple[list[int], list[float], float, float]:
        return self.runner.collect(launched)

    def read_scores(self, launched: Launched) -> tuple[list[float], list[list[int]], list[list[float]]]:
        return self.runner.read_scores(launched)

    def read_top_logprobs(self, launched: Launched) -> tuple[np.ndarray, np.ndarray]:
        return self.runner.read_top_logprobs(launched)

    def release_graphs(self) -> None:
        self.runner.release_graphs()
