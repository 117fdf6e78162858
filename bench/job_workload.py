"""The job-path workload: a random-weight Qwen2-1.5B-shaped model folder with the real Qwen2 tokenizer,
and a few thousand instruction prompts of varied length, written as the files a user would point
``python run.py job=synthetic_data model=hf data=jsonl`` at."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from transformers import PretrainedConfig, Qwen2Config

from engine import build_random_model

QWEN2_1_5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    tie_word_embeddings=True,
    rope_theta=1e6,
    max_position_embeddings=32768,
    bos_token_id=151643,
    eos_token_id=151645,
)
_DONE = ".complete"

TASKS = [
    "Write a short story about",
    "Explain to a twelve-year-old how",
    "List five surprising facts about",
    "Draft a polite email asking about",
    "Summarise the main arguments for and against",
    "Write a product description for",
    "Give step-by-step instructions for",
    "Compose a limerick about",
    "Describe a day in the life of",
    "Write a dialogue between two experts on",
]
TOPICS = [
    "lighthouses",
    "sourdough bread",
    "the history of the bicycle",
    "volcanoes",
    "urban beekeeping",
    "quantum computing",
    "medieval castles",
    "coral reefs",
    "the printing press",
    "electric cars",
    "chess openings",
    "desert survival",
    "the immune system",
    "jazz improvisation",
    "rainforest frogs",
    "solar sails",
    "ancient libraries",
    "tidal energy",
    "origami",
    "weather forecasting",
]
CONTEXT = [
    "Keep the tone friendly and concrete.",
    "The reader has no background in the subject.",
    "Mention at least one historical detail.",
    "Avoid jargon unless you explain it.",
    "Use a clear structure with a beginning, a middle and an end.",
    "Include one memorable example.",
    "The text will be read aloud, so keep sentences short.",
    "End with a question that invites reflection.",
]


def write_model_folder(
    folder: Path,
    tokenizer_dir: Path,
    device: torch.device,
    config: PretrainedConfig | None = None,
    **shape: int,
) -> Path:
    """A random-weight Qwen2-1.5B-shaped checkpoint (bf16 on CUDA; ``shape`` overrides sizes; ``config``
    another model's shape) with the real tokenizer, written once."""
    folder = Path(folder)
    if (folder / _DONE).exists():
        return folder
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer_config.json").exists():
        raise FileNotFoundError(
            f"no tokenizer in {tokenizer_dir}: point bench.tokenizer_dir (or BATCHGEN_QWEN2_TOKENIZER) at the "
            "Qwen2 tokenizer folder (vocab.json, merges.txt, tokenizer_config.json)"
        )
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    config = Qwen2Config(**(QWEN2_1_5B | shape)) if config is None else config
    model = build_random_model(config, dtype, device, seed=0)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    for path in tokenizer_dir.iterdir():
        if path.is_file():
            shutil.copy(path, folder / path.name)
    (folder / _DONE).write_text("")
    return folder


def instruction(rng: random.Random) -> str:
    """One instruction: a task, a topic and 0 to 24 sentences of context (prompts of ~10 to ~250 tokens)."""
    parts = [f"{rng.choice(TASKS)} {rng.choice(TOPICS)}."]
    parts += [rng.choice(CONTEXT) for _ in range(rng.choice([0, 1, 2, 4, 8, 16, 24]))]
    return " ".join(parts)


def write_prompts(path: Path, count: int, seed: int = 0) -> Path:
    """``count`` JSONL rows ``{"id": "p<i>", "prompt": <instruction>}``."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"id": f"p{i}", "prompt": instruction(rng)}) + "\n")
    return path
