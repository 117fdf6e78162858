"""lm-evaluation-harness on a local multiple-choice task: ``--model batchgen`` against lm-eval's ``hf``.

Writes a random-weight Llama-3.2-1B-shaped model folder with a real tokenizer (its vocabulary
sized to the tokenizer's; bf16 on CUDA, float32 on CPU) and a multiple-choice task (a task YAML over
a local JSON Lines file of synthetic questions of realistic lengths, fixed seed), then runs
``lm_eval.simple_evaluate`` on it with each backend in this process, one after the other.

Timing: each backend's model is built and warmed up first (``load s``: model load, engine build,
and a ``simple_evaluate`` on a separate small warm-up task); ``eval s`` is the wall time of the
timed ``simple_evaluate`` alone (task loading, request building, the model's calls, metrics and
lm-eval's own bookkeeping), ``model s`` the part of it spent in the backend's ``loglikelihood``.
Agreement: the fraction of questions whose chosen answer (the highest loglikelihood) is the same.

    python -m bench.scripts.lm_eval_compare --tokenizer-dir .gpu/final/qwen2-tokenizer      # 1B, CUDA
    python -m bench.scripts.lm_eval_compare --tokenizer-dir ... --samples 500 --backends batchgen
    python -m bench.scripts.lm_eval_compare --tiny --samples 20                              # CPU, tiny model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import textwrap
import time
from pathlib import Path
from typing import Any

TASK, WARMUP_TASK = "bg_compare_mc", "bg_compare_warmup"
BACKENDS = ("batchgen", "hf")
_WORD_LIST = """
the of and to in is was for on that with as by at from his her an which are were be this had not
but they have one all their there been has who more when will would no if out so can said what
about into than them only other new some could time these two may first then do any like my now
over such our man me even most made after also did many before must through back years where much
your way well down should because each just those people how too little state good very make world
still own see men work long get here between both life being under never day same another know
while last might us great old year off come since against go came right used take three river
water energy market village history science animal engine island garden teacher planet winter
bridge council harvest library mountain signal voyage theory forest metal coast season painter
machine museum orchestra patient kingdom storm method tower journey ocean theorem experiment
"""
WORDS = tuple(_WORD_LIST.split())


def sentence(rng: random.Random, words: int) -> str:
    """``words`` words from a common-word list, capitalised, ending with a full stop."""
    text = " ".join(rng.choice(WORDS) for _ in range(max(1, words)))
    return text[0].upper() + text[1:] + "."


def question(rng: random.Random, choices: int) -> dict[str, Any]:
    """A context of 10 to 230 words (about 15 to 300 tokens) and ``choices`` distinct answers of 1 to 30 words."""
    n = rng.choice([rng.randint(10, 60), rng.randint(40, 120), rng.randint(100, 230)])
    parts, left = [], n
    while left > 0:
        k = min(left, rng.randint(6, 24))
        parts.append(sentence(rng, k))
        left -= k
    answers: list[str] = []
    while len(answers) < choices:
        a = sentence(rng, rng.choice([rng.randint(1, 5), rng.randint(4, 14), rng.randint(10, 30)]))
        if a not in answers:
            answers.append(a)
    return {"context": " ".join(parts), "choices": answers, "answer": rng.randrange(choices)}


def write_task(folder: Path, name: str, samples: int, choices: int, seed: int) -> None:
    """``<name>.jsonl`` of ``samples`` questions and ``<name>.yaml``, an lm-eval multiple-choice task over it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    data = folder / f"{name}.jsonl"
    with open(data, "w") as f:
        for _ in range(samples):
            f.write(json.dumps(question(rng, choices)) + "\n")
    (folder / f"{name}.yaml").write_text(
        textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data.resolve()}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{context}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        target_delimiter: " "
        metric_list:
          - metric: acc
          - metric: acc_norm
        """)
    )


def model_folder(work: Path, tokenizer_dir: Path, tiny: bool, device: Any) -> Path:
    """The built-in tiny model (``tiny``), else a random-weight Llama-3.2-1B-shaped folder with ``tokenizer_dir``'s tokenizer."""
    if tiny:
        from jobs import tiny_model

        return tiny_model.materialise("tiny_chat", work / "models")
    from transformers import AutoTokenizer, LlamaConfig

    from bench.job_workload import write_model_folder
    from bench.workloads import LLAMA32_1B

    if not (tokenizer_dir / "tokenizer_config.json").exists():
        raise SystemExit(
            f"no tokenizer in {tokenizer_dir}: pass --tokenizer-dir (a folder with tokenizer_config.json)"
        )
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = -(-len(tok) // 128) * 128  # every token id of the tokenizer, padded as checkpoints usually are
    config = LlamaConfig(
        **(LLAMA32_1B | {"vocab_size": vocab}),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return write_model_folder(work / "models" / f"llama3.2-1b-random-v{vocab}", tokenizer_dir, device, config)


def make_lm(backend: str, path: Path, args: argparse.Namespace) -> Any:
    """The backend's lm-eval model, built as ``simple_evaluate`` builds it from ``--model``."""
    from lm_eval.api.registry import get_model
    from lm_eval.utils import simple_parse_args_string

    import lm_eval_batchgen.model  # noqa: F401  (registers "batchgen")

    model_args: dict[str, Any] = {"pretrained": str(path), "dtype": args.dtype}
    model_args |= simple_parse_args_string(args.batchgen_args if backend == "batchgen" else args.hf_args)
    return get_model(backend).create_from_arg_obj(
        model_args,
        {"batch_size": args.hf_batch_size, "max_batch_size": args.hf_max_batch_size, "device": args.device},
    )


def evaluate(lm: Any, task: str, folder: Path) -> dict[str, Any]:
    """``simple_evaluate`` of the built ``lm`` on ``task`` (greedy scoring, per-sample results logged)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def release(lm: Any) -> None:
    """Free the backend's model and its GPU memory before the next backend loads."""
    import torch

    engine = getattr(lm, "engine", None)
    if engine is not None:
        engine.close()
    del lm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_backend(backend: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Load and warm up, then time one ``simple_evaluate`` on the task; per-question loglikelihoods."""
    t0 = time.perf_counter()
    lm = make_lm(backend, path, args)
    evaluate(lm, WARMUP_TASK, args.tasks_dir)
    load_s = time.perf_counter() - t0
    inner = lm.loglikelihood
    model_s = 0.0

    def timed(requests: Any, *a: Any, **kw: Any) -> Any:
        nonlocal model_s
        t = time.perf_counter()
        try:
            return inner(requests, *a, **kw)
        finally:
            model_s += time.perf_counter() - t

    lm.loglikelihood = timed
    t1 = time.perf_counter()
    results = evaluate(lm, TASK, args.tasks_dir)
    eval_s = time.perf_counter() - t1
    lls = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in results["samples"][TASK]}
    metrics = results["results"][TASK]
    out = {
        "backend": backend,
        "load_s": load_s,
        "eval_s": eval_s,
        "model_s": model_s,
        "samples": len(lls),
        "requests": sum(len(v) for v in lls.values()),
        "acc": metrics["acc,none"],
        "acc_norm": metrics["acc_norm,none"],
        "batch_sizes": results["config"].get("batch_sizes"),
        "lls": [lls[i] for i in sorted(lls)],
    }
    release(lm)
    return out


def agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Fraction of questions whose highest-loglikelihood answer is the same, and the largest loglikelihood gap."""

    def pick(lls: list[float]) -> int:
        return max(range(len(lls)), key=lls.__getitem__)

    same = sum(pick(x) == pick(y) for x, y in zip(a["lls"], b["lls"], strict=True))
    gap = max(
        (abs(u - v) for x, y in zip(a["lls"], b["lls"], strict=True) for u, v in zip(x, y, strict=True)),
        default=0.0,
    )
    return {
        "answer_agreement": same / max(1, len(a["lls"])),
        "acc_equal": a["acc"] == b["acc"],
        "max_abs_loglikelihood_diff": gap,
    }


def report(runs: list[dict[str, Any]], agree: dict[str, float] | None) -> None:
    """A markdown table of the runs, then the agreement line."""
    print(
        "| backend | questions | requests | load s | eval s | questions/s | model s | questions/s (model) "
        "| load+eval s | acc | acc_norm |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['backend']} | {r['samples']} | {r['requests']} | {r['load_s']:.1f} | {r['eval_s']:.2f} | "
            f"{r['samples'] / r['eval_s']:.1f} | {r['model_s']:.2f} | {r['samples'] / r['model_s']:.1f} | "
            f"{r['load_s'] + r['eval_s']:.1f} | {r['acc']:.4f} | {r['acc_norm']:.4f} |"
        )
    if agree is not None:
        print(
            f"answer agreement {agree['answer_agreement']:.4f}, acc equal: {agree['acc_equal']}, "
            f"max |loglikelihood difference| {agree['max_abs_loglikelihood_diff']:.3g}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options, write the model and the task, run the backends; returns what it writes to ``result.json``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.scripts.lm_eval_compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--samples", type=int, default=2000, help="questions in the timed task")
    parser.add_argument("--choices", type=int, default=4, help="answers per question")
    parser.add_argument(
        "--warmup-samples", type=int, default=16, help="questions in the untimed warm-up task"
    )
    parser.add_argument("--backends", default=",".join(BACKENDS), help="batchgen and/or hf, comma-separated")
    parser.add_argument("--tiny", action="store_true", help="the built-in tiny model instead of the 1B shape")
    parser.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=Path(os.environ.get("BATCHGEN_QWEN2_TOKENIZER", "../shared/data/qwen2-tokenizer")),
        help="tokenizer folder of the 1B model (default $BATCHGEN_QWEN2_TOKENIZER or ../shared/data/qwen2-tokenizer)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/lm-eval-compare"))
    parser.add_argument("--device", default=None, help="default cuda where available, else cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--hf-batch-size", default=None, help="hf's batch_size (default auto on CUDA, 16 on CPU)"
    )
    parser.add_argument(
        "--hf-max-batch-size", type=int, default=256, help="hf's upper bound for batch_size=auto"
    )
    parser.add_argument("--hf-args", default="", help="more hf model_args, e.g. attn_implementation=sdpa")
    parser.add_argument(
        "--batchgen-args", default="", help="more batchgen model_args, e.g. max_batch_tokens=8192"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or set(backends) - set(BACKENDS):
        parser.error(f"--backends: use batchgen and/or hf, got {args.backends!r}")

    import torch

    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.hf_batch_size = args.hf_batch_size or ("auto" if args.device.startswith("cuda") else "16")
    args.tasks_dir = args.work_dir / "tasks"
    t = time.perf_counter()
    path = model_folder(args.work_dir, args.tokenizer_dir, args.tiny, torch.device(args.device))
    write_task(args.tasks_dir, TASK, args.samples, args.choices, args.seed)
    write_task(args.tasks_dir, WARMUP_TASK, args.warmup_samples, args.choices, args.seed + 1)
    print(f"model {path}, task {args.samples} x {args.choices} ({time.perf_counter() - t:.1f} s)", flush=True)

    runs = [run_backend(b, path, args) for b in backends]
    agree = agreement(runs[0], runs[1]) if len(runs) == 2 else None
    result = {
        "model": str(path),
        "device": args.device,
        "dtype": args.dtype,
        "hf_batch_size": args.hf_batch_size,
        "batchgen_args": args.batchgen_args,
        "runs": [{k: v for k, v in r.items() if k != "lls"} for r in runs],
        "agreement": agree,
    }
    (args.work_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    report(runs, agree)
    return result


if __name__ == "__main__":
    # No network where this runs: the model, the tokenizer and the data are local files.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
