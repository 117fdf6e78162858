"""lm-evaluation-harness with ``--model batchgen`` gives the same per-sample results as its own ``hf`` backend.

Two local tasks over small JSON Lines files (a multiple-choice task: loglikelihood; a generation
task: generate_until) and a perplexity task (loglikelihood_rolling), on the built-in tiny model
saved to a folder, float32 and greedy. Skipped when lm-eval is not installed (``pip install -e .[eval]``).
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

pytest.importorskip("lm_eval")

from jobs import tiny_model  # noqa: E402
from jobs_helpers import ROOT  # noqa: E402

CHOICES = ROOT / "jobs" / "assets" / "choices.jsonl"
PROMPTS = ROOT / "jobs" / "assets" / "prompts.jsonl"


def write_tasks(folder) -> list[str]:
    """Task YAMLs pointing at local JSON Lines files; returns the task names."""
    mc, gen, ppl = folder / "mc.jsonl", folder / "gen.jsonl", folder / "ppl.jsonl"
    rows = [json.loads(line) for line in CHOICES.read_text().splitlines()]
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [json.loads(line) for line in PROMPTS.read_text().splitlines()][:6]
    gen.write_text("".join(json.dumps({"q": p["prompt"], "a": "x"}) + "\n" for p in prompts))
    ppl.write_text("".join(json.dumps({"text": p["prompt"]}) + "\n" for p in prompts[:4]))
    (folder / "bg_mc.yaml").write_text(
        textwrap.dedent(f"""\
        task: bg_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {mc}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{context}}}}"
        doc_to_choice: "{{{{continuations}}}}"
        doc_to_target: answer
        target_delimiter: ""
        metric_list:
          - metric: acc
        """)
    )
    (folder / "bg_gen.yaml").write_text(
        textwrap.dedent(f"""\
        task: bg_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {gen}
        test_split: test
        output_type: generate_until
        doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
        doc_to_target: a
        generation_kwargs:
          until: ["\\n\\n", "Question:"]
          max_gen_toks: 12
          do_sample: false
        metric_list:
          - metric: exact_match
        """)
    )
    (folder / "bg_ppl.yaml").write_text(
        textwrap.dedent(f"""\
        task: bg_ppl
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {ppl}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
        """)
    )
    return ["bg_mc", "bg_gen", "bg_ppl"]


def evaluate(model: str, model_args: str, folder, tasks: list[str]) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lm_eval_batchgen.model  # noqa: F401  (registers "batchgen")

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        batch_size=1,
        device="cpu",
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def per_sample(results: dict, task: str) -> list:
    return [(s["doc_id"], s["resps"]) for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_batchgen_matches_hf_backend_sample_for_sample(tmp_path, models_dir):
    pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate")
    path = tiny_model.materialise("tiny_chat", models_dir)
    tasks = write_tasks(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = evaluate(
            "batchgen", f"pretrained={path},dtype=float32,max_batch_tokens=64,block_size=8", tmp_path, tasks
        )
        theirs = evaluate("hf", f"pretrained={path},dtype=float32", tmp_path, tasks)
    finally:
        torch.set_num_threads(before)
    mc_ours, mc_theirs = per_sample(ours, "bg_mc"), per_sample(theirs, "bg_mc")
    assert len(mc_ours) == 20 and [d for d, _ in mc_ours] == [d for d, _ in mc_theirs]
    for (_, a), (_, b) in zip(mc_ours, mc_theirs, strict=True):
        assert len(a) == len(b)
        for (lp_a, greedy_a), (lp_b, greedy_b) in ((x[0], y[0]) for x, y in zip(a, b, strict=True)):
            assert lp_a == pytest.approx(lp_b, abs=1e-4) and greedy_a == greedy_b
    assert per_sample(ours, "bg_gen") == per_sample(theirs, "bg_gen")
    assert any(r[0][0] for _, r in per_sample(ours, "bg_gen")), "some generation is not empty"
    for (_, a), (_, b) in zip(per_sample(ours, "bg_ppl"), per_sample(theirs, "bg_ppl"), strict=True):
        assert a[0][0] == pytest.approx(b[0][0], abs=1e-3)
    assert ours["results"]["bg_mc"]["acc,none"] == theirs["results"]["bg_mc"]["acc,none"]


def test_batchgen_lm_eval_registers_the_model_then_runs_lm_evals_command_line(monkeypatch):
    import lm_eval.__main__
    from lm_eval.api.registry import get_model

    from lm_eval_batchgen import cli

    called = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: called.append(get_model("batchgen")))
    cli.main()
    assert called and called[0].__name__ == "BatchgenLM"


@pytest.mark.slow  # about 20 s: lm-eval's command line indexes all of its own tasks at start
def test_batchgen_lm_eval_command_runs_a_task(tmp_path, models_dir, preloaded_cli):
    path = tiny_model.materialise("tiny_chat", models_dir)
    write_tasks(tmp_path)
    proc = preloaded_cli.run(  # python -m lm_eval_batchgen ...
        ["--model", "batchgen", "--model_args", f"pretrained={path},dtype=float32", "--tasks", "bg_mc",
         "--include_path", str(tmp_path), "--limit", "4", "--output_path", str(tmp_path / "out")],
        module="lm_eval_batchgen", timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bg_mc" in proc.stdout and "acc" in proc.stdout
