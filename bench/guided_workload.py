"""A JSON schema on a fraction of a workload's requests (``python -m bench.workloads w2 --json-schema ...``).

Masks need each token's text, so a guided workload runs with the real Qwen2 tokenizer and the model takes
Qwen2's vocabulary (151,936 tokens; W2's Llama-3.2-1B shape otherwise unchanged). Guided requests end when
their document is complete (EOS allowed then) or at their new-token count; the other requests keep the
workload's exact lengths (EOS ignored).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.json_schemas import W2_SCHEMA

QWEN2_VOCAB = 151936
DEFAULT_TOKENIZER = os.environ.get("BATCHGEN_QWEN2_TOKENIZER", "../shared/data/qwen2-tokenizer")


@functools.cache
def _load_tokenizer(directory: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@dataclass(frozen=True)
class GuidedLoad:
    """Request ``i`` is guided when the running count of guided requests at ``fraction`` steps up at ``i``
    (1.0: every request; 0.5: every other one, from the second; 0: none, the same model and tokenizer
    unconstrained, as a baseline)."""

    schema: str
    fraction: float
    tokenizer_dir: str

    def is_guided(self, index: int) -> bool:
        return int((index + 1) * self.fraction) > int(index * self.fraction)

    def tokenizer(self) -> Any:
        """The tokenizer (loaded once per folder)."""
        return _load_tokenizer(self.tokenizer_dir)

    def label(self) -> str:
        return f"json{int(round(100 * self.fraction))}%"


def guided_load(json_schema: str, fraction: float, tokenizer_dir: str | None = None) -> GuidedLoad:
    """``json_schema``: a schema file, or ``w2`` for ``bench.json_schemas.W2_SCHEMA``."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"--guided-fraction must be in [0, 1], got {fraction}")
    text = json.dumps(W2_SCHEMA) if json_schema == "w2" else Path(json_schema).read_text()
    json.loads(text)
    directory = tokenizer_dir or DEFAULT_TOKENIZER
    if not (Path(directory) / "tokenizer_config.json").exists():
        raise FileNotFoundError(
            f"no tokenizer in {directory}: pass --tokenizer (or set BATCHGEN_QWEN2_TOKENIZER) to the Qwen2 tokenizer"
        )
    return GuidedLoad(text, fraction, directory)


@dataclass
class GuidedCounts:
    """What a guided run's requests ended with, and the CPU time spent filling masks."""

    rows: int = 0
    complete: int = 0
    valid_json: int = 0
    mask_s: float = 0.0
    masked_rows: int = 0

    def add(self, finish_reason: str, text: str) -> None:
        self.rows += 1
        if finish_reason == "stop":
            self.complete += 1
            try:
                json.loads(text)
                self.valid_json += 1
            except json.JSONDecodeError:
                pass

    def summary(self, steps: int) -> str:
        per_step = 1000 * self.mask_s / max(1, steps)
        per_row = 1e6 * self.mask_s / max(1, self.masked_rows)
        return (
            f"guided {self.rows} rows: {self.complete} complete ({self.valid_json} parse), "
            f"{self.rows - self.complete} truncated; masks {per_step:.2f} ms/step {per_row:.1f} us/row"
        )
