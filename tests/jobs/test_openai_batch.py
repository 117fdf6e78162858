"""job=openai_batch: OpenAI batch input in, OpenAI batch output lines out (validated with the ``openai``
package's own types), one line per request after kills; reasoning split and the thinking budget."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from openai import BaseModel as OpenAIModel
from openai.types import BatchError, Completion
from openai.types.chat import ChatCompletion

from jobs import openai_batch, tiny_model
from jobs.generate import output_dir
from jobs.pipeline import faults
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs.pipeline.openai_output import ERRORS_NAME, OUTPUT_NAME
from jobs.pipeline.reasoning import split_reasoning
from jobs_helpers import compose_config, read_rows, write_jsonl


class BatchResponse(OpenAIModel):
    status_code: int
    request_id: str
    body: dict


class BatchOutputLine(OpenAIModel):
    """A line of a batch output or error file (OpenAI's Batch API reference; the package has no model of it)."""

    id: str
    custom_id: str | None
    response: BatchResponse | None
    error: BatchError | None


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chat(cid, content, **body):
    messages = [{"role": "user", "content": content}]
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "tiny-chat", "messages": messages} | body,
    }


def completion(cid, prompt, **body):
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tiny-chat", "prompt": prompt} | body,
    }


def batch_lines() -> list:
    """A realistic batch: chat and completion requests, n > 1, stop, max_tokens, logprobs, and bad lines."""
    lines = [
        chat("chat-plain", "Name three colours.", max_tokens=12, temperature=0),
        chat("chat-n3", "Write a haiku about the sea.", n=3, max_tokens=10, temperature=0.8, seed=5),
        chat("chat-stop", "Count to ten.", max_tokens=20, stop=["e", "a"], temperature=0),
        chat(
            "chat-logprobs", "Say hello.", max_completion_tokens=8, logprobs=True, top_logprobs=3, n=2, seed=1
        ),
        completion("text-plain", "Once upon a time", max_tokens=9, temperature=0),
        completion(
            "text-logprobs", "The capital of France is", max_tokens=7, logprobs=2, n=2, seed=3, stop="o"
        ),
        completion("text-ids", [5, 6, 7, 8], max_tokens=5, temperature=0),
        "{this is not json",
        {
            "custom_id": "wrong-endpoint",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "tiny-chat", "input": "x"},
        },
        chat("other-model", "Hi", model="gpt-4o"),
        chat("too-hot", "Hi", temperature=-1),
        chat("top-without-logprobs", "Hi", top_logprobs=2),
        chat("top-above-the-limit", "Hi", logprobs=True, top_logprobs=21),  # the engine's default limit: 20
        chat("alias", "Hello there", model="my-alias", max_tokens=6),
    ]
    for i in range(12):  # enough rows for several commits, so that kills land mid-run
        lines.append(
            chat(f"bulk-{i}", f"Tell me about topic {i}.", max_tokens=14 + i % 5, temperature=0.7, seed=i)
        )
    return lines


def write_batch(path: Path) -> tuple[Path, list]:
    lines = batch_lines()
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    ids = [None if isinstance(ln, str) else ln["custom_id"] for ln in lines]
    return path, ids


def overrides(root, models_dir, batch):
    return [
        "job=openai_batch",
        f"data.path={batch}",
        f"output_root={root}",
        f"models_dir={models_dir}",
        "job.accept_models=[my-alias]",
        "engine.max_num_seqs=4",
        "checkpoint.rows=3",
        "runner.progress=false",
    ]


def read_lines(out_dir: Path) -> tuple[list[dict], list[dict]]:
    return tuple(
        [json.loads(ln) for ln in (out_dir / name).read_text().splitlines()]
        for name in (OUTPUT_NAME, ERRORS_NAME)
    )


def check_lines(out_dir: Path, ids: list, lines: list) -> None:
    """Every line valid; one line per request, none twice, each file in input order."""
    output, errors = read_lines(out_dir)
    seen = []
    for line in output:
        parsed = BatchOutputLine.model_validate(line)
        assert parsed.error is None and parsed.response.status_code == 200
        body = line["response"]["body"]
        request = next(ln for ln in lines if not isinstance(ln, str) and ln["custom_id"] == line["custom_id"])
        req = request["body"]
        model = ChatCompletion if request["url"] == "/v1/chat/completions" else Completion
        obj = model.model_validate(body)
        assert obj.model == "tiny-chat" and body["object"] == (
            "chat.completion" if model is ChatCompletion else "text_completion"
        )
        assert [c.index for c in obj.choices] == list(range(req.get("n", 1)))
        assert {c.finish_reason for c in obj.choices} <= {"stop", "length"}
        assert obj.usage.total_tokens == obj.usage.prompt_tokens + obj.usage.completion_tokens
        limit = req.get("max_tokens") or req.get("max_completion_tokens")
        for c in obj.choices:
            text = c.message.content if model is ChatCompletion else c.text
            for stop in [req["stop"]] if isinstance(req.get("stop"), str) else req.get("stop", []):
                assert stop not in text
            if req.get("logprobs") is not None and req.get("logprobs") is not False:
                if model is ChatCompletion:
                    tokens = c.logprobs.content
                    k = req.get("top_logprobs", 0)
                    for t in (
                        tokens
                    ):  # the alternatives asked for, most likely first, the best at least the chosen
                        assert len(t.top_logprobs) == k and t.logprob <= 0
                        lps = [a.logprob for a in t.top_logprobs]
                        assert lps == sorted(lps, reverse=True) and (not k or lps[0] >= t.logprob - 1e-6)
                else:
                    tokens = c.logprobs.tokens
                    assert len(c.logprobs.token_logprobs) == len(tokens) == len(c.logprobs.text_offset)
                    k = req["logprobs"]  # alternatives by text: tokens that decode alike share an entry
                    assert all(0 < len(top) <= k for top in c.logprobs.top_logprobs)
                    assert len(c.logprobs.top_logprobs) == len(tokens)
                assert 0 < len(tokens) <= limit
            else:
                assert c.logprobs is None
        seen.append(line["custom_id"])
    assert seen == [i for i in ids if i in seen]  # input order
    error_ids = []
    for line in errors:
        parsed = BatchOutputLine.model_validate(line)
        assert parsed.response is None and parsed.error.code and parsed.error.message
        error_ids.append(line["custom_id"])
    assert error_ids == [i for i in ids if i in error_ids]
    assert sorted(map(str, seen + error_ids)) == sorted(map(str, ids))  # every request once, none twice
    by_id = {ln["custom_id"]: ln["error"] for ln in errors}
    assert by_id[None]["message"].startswith("invalid JSON")
    assert by_id["wrong-endpoint"]["code"] == "invalid_url"
    assert by_id["other-model"]["code"] == "model_not_found" and "gpt-4o" in by_id["other-model"]["message"]
    assert "temperature must be >= 0" in by_id["too-hot"]["message"]
    assert "top_logprobs needs logprobs=true" in by_id["top-without-logprobs"]["message"]
    too_many = by_id["top-above-the-limit"]
    assert too_many["code"] == "invalid_request" and "engine.max_top_logprobs" in too_many["message"]
    assert set(by_id) == {
        None,
        "wrong-endpoint",
        "other-model",
        "too-hot",
        "top-without-logprobs",
        "top-above-the-limit",
    }


def comparable(out_dir: Path) -> list:
    """The lines less their creation times (those of the chunk files)."""
    output, errors = read_lines(out_dir)
    for line in output:
        del line["response"]["body"]["created"]
    return output + errors


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("openai")
    batch, ids = write_batch(root / "requests.jsonl")
    cfg = compose_config(overrides(root / "base", models_dir, batch))
    stats = openai_batch.run(cfg)
    assert stats.complete
    return batch, ids, output_dir(cfg)


def test_every_line_validates_with_the_openai_types_one_per_request(baseline):
    batch, ids, out_dir = baseline
    check_lines(out_dir, ids, batch_lines())
    output, _ = read_lines(out_dir)
    text = next(ln for ln in output if ln["custom_id"] == "text-logprobs")["response"]["body"]["choices"][0]
    assert "".join(text["logprobs"]["tokens"]) == text["text"] or text["finish_reason"] == "stop"
    rows = {r["custom_id"]: r for r in read_rows(out_dir)}
    chat_lp = next(ln for ln in output if ln["custom_id"] == "chat-logprobs")["response"]["body"]["choices"][
        1
    ]
    assert [t["logprob"] for t in chat_lp["logprobs"]["content"]] == pytest.approx(
        rows["chat-logprobs-1"]["logprobs"]
    )
    assert chat_lp["message"]["content"] == rows["chat-logprobs-1"]["completion"]
    # The alternatives are the rows' Arrow columns, as token texts.
    row = rows["chat-logprobs-1"]
    alternatives = [t["top_logprobs"] for t in chat_lp["logprobs"]["content"]]
    assert_same([[a["logprob"] for a in top] for top in alternatives], row["top_logprobs"])
    assert len(row["top_token_ids"]) == row["completion_tokens"] and {
        len(t) for t in row["top_token_ids"]
    } == {3}
    assert (
        rows["chat-plain-0"]["top_token_ids"] is None
        and rows["chat-plain-0"]["sampling"]["top_logprobs"] == 0
    )


def test_rerun_of_a_complete_run_rewrites_the_files(baseline, models_dir):
    batch, ids, out_dir = baseline
    before = (out_dir / OUTPUT_NAME).read_bytes(), (out_dir / ERRORS_NAME).read_bytes()
    (out_dir / OUTPUT_NAME).unlink()
    cfg = compose_config(overrides(out_dir.parents[1], models_dir, batch))
    assert output_dir(cfg) == out_dir
    openai_batch.run(cfg, make_engine=lambda cfg: pytest.fail("a complete run loads no model"))
    assert ((out_dir / OUTPUT_NAME).read_bytes(), (out_dir / ERRORS_NAME).read_bytes()) == before


def committed(manifest_path: Path) -> int:
    try:
        return Manifest.load(manifest_path).rows
    except Exception:
        return 0


def test_killed_at_random_points_then_resumed_gives_the_same_lines(
    tmp_path, models_dir, baseline, preloaded_cli
):
    batch, ids, base_dir = baseline
    args = overrides(tmp_path, models_dir, batch)
    out_dir = output_dir(compose_config(args))
    rng = random.Random(11)
    kills = 0
    for threshold in (3, 9, 15):
        proc = preloaded_cli.start(args)
        deadline = time.monotonic() + 90
        while (
            proc.poll() is None
            and committed(out_dir / MANIFEST_NAME) < threshold
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            proc.kill()
            kills += 1
            # written only once the run is complete
            assert not (out_dir / OUTPUT_NAME).exists() or Manifest.load(out_dir / MANIFEST_NAME).complete
        proc.communicate()
    assert kills >= 2
    # Killed while writing the files: the run is complete, the files are not there yet.
    assert not Manifest.load(out_dir / MANIFEST_NAME).complete
    proc = preloaded_cli.start(args, env={"BATCHGEN_FAULTS": "openai-rename:signal=KILL@1"})
    proc.communicate(timeout=180)
    assert proc.returncode == -9 and Manifest.load(out_dir / MANIFEST_NAME).complete
    assert not (out_dir / OUTPUT_NAME).exists() and not (out_dir / ERRORS_NAME).exists()
    assert openai_batch.run(compose_config(args)).complete
    check_lines(out_dir, ids, batch_lines())
    assert_same(comparable(out_dir), comparable(base_dir))


def assert_same(got, want, where="lines"):
    """Equal, logprobs to 1e-4 (batch composition moves a float32 logprob by an ulp: a resumed run's batches differ)."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def test_files_of_an_earlier_completion_are_removed_when_the_run_extends(
    tmp_path, models_dir, baseline, monkeypatch
):
    batch, ids, _ = baseline
    args = overrides(tmp_path, models_dir, batch)
    out_dir = output_dir(compose_config(args))
    openai_batch.run(compose_config([*args, "data.limit=3"]))
    output, errors = read_lines(out_dir)
    assert [ln["custom_id"] for ln in output + errors] == ids[:3]
    renames: list[bool] = []  # whether an earlier file is there, at each chunk's rename of the extended run

    def inject(point: str) -> None:
        if point == "chunk-rename":
            renames.append((out_dir / OUTPUT_NAME).exists() or (out_dir / ERRORS_NAME).exists())

    monkeypatch.setattr(faults, "inject", inject)
    assert openai_batch.run(compose_config(args)).complete
    assert len(renames) >= 2 and not any(renames), renames
    check_lines(out_dir, ids, batch_lines())


# -- reasoning -------------------------------------------------------------------------------------

THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory, models_dir):
    """The built-in tiny model with a chat template that opens a <think> span (closed when enable_thinking=false)."""
    src = tiny_model.materialise("tiny_chat", models_dir)
    dst = tmp_path_factory.mktemp("thinking") / "tiny-thinker"
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    return dst


def reasoning_run(root, models_dir, model, lines, *extra, end=None):
    root.mkdir(parents=True, exist_ok=True)
    batch = write_jsonl(root / "think.jsonl", lines)
    cfg = compose_config(
        [
            "job=openai_batch",
            f"data.path={batch}",
            f"output_root={root}",
            f"models_dir={models_dir}",
            "model=hf",
            f"model.model={model}",
            "runner.progress=false",
            *extra,
        ]
    )
    if end is not None:  # set on the typed config: any text, no override quoting
        cfg.job.reasoning.end = end
    assert openai_batch.run(cfg).complete
    rows = {r["custom_id"]: r for r in read_rows(output_dir(cfg))}
    output, errors = read_lines(output_dir(cfg))
    assert errors == []
    bodies = {ln["custom_id"]: ChatCompletion.model_validate(ln["response"]["body"]) for ln in output}
    return cfg, rows, bodies


def think_requests(**body):
    return [
        chat("think-0", "Why is the sky blue?", max_tokens=40, temperature=0, ignore_eos=True, **body),
        chat("think-1", "Plan a picnic.", max_tokens=40, n=2, seed=4, ignore_eos=True, **body),
        chat(
            "no-think",
            "Hi",
            max_tokens=20,
            temperature=0,
            ignore_eos=True,
            chat_template_kwargs={"enable_thinking": False},
        ),
    ]


def test_budget_forces_the_end_marker_at_the_budget_and_splits_there(tmp_path, models_dir, thinking_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(thinking_model)
    end_ids = tok.encode("</think>", add_special_tokens=False)
    budget = 9
    cfg, rows, bodies = reasoning_run(
        tmp_path,
        models_dir,
        thinking_model,
        think_requests(),
        "+job.prompt.chat_template_kwargs.enable_thinking=true",
        f"job.reasoning.max_tokens={budget}",
    )
    for cid in ("think-0-0", "think-1-0", "think-1-1"):
        r = rows[cid]
        assert r["prompt"].endswith("<|im_start|>assistant\n<think>\n")
        assert r["token_ids"][budget : budget + len(end_ids)] == end_ids  # the forced marker, at the budget
        assert r["sampling"]["max_think_tokens"] == budget
        text = tok.decode(r["token_ids"])
        assert r["reasoning"] + "</think>" + r["completion"] == text
        assert r["reasoning"] == text[: text.index("</think>")] and r["reasoning"] == tok.decode(
            r["token_ids"][:budget]
        )
        choice = bodies[cid.rsplit("-", 1)[0]].choices[int(cid[-1])]
        assert (
            choice.message.reasoning_content == r["reasoning"] and choice.message.content == r["completion"]
        )
    nt = rows["no-think-0"]  # its own kwargs closed the thinking in the prompt: no budget, no split
    assert nt["prompt"].endswith("<think>\n\n</think>\n\n") and nt["reasoning"] is None
    assert (
        nt["sampling"]["max_think_tokens"] is None
        and "reasoning_content" not in bodies["no-think"].choices[0].message.model_extra
    )


def test_without_budget_the_split_is_exactly_at_the_first_marker(tmp_path, models_dir, thinking_model):
    cfg, rows, bodies = reasoning_run(
        tmp_path / "a",
        models_dir,
        thinking_model,
        think_requests(chat_template_kwargs={"enable_thinking": True}),
    )
    r = rows["think-0-0"]
    assert r["reasoning"] is not None and r["completion"] == ""  # never closed: all thinking, no answer
    assert r["sampling"]["max_think_tokens"] is None
    text = r["reasoning"]
    marker = text[10:14]  # a span the model did generate, as the end marker
    assert marker.strip()
    cfg, rows, bodies = reasoning_run(
        tmp_path / "b",
        models_dir,
        thinking_model,
        think_requests(chat_template_kwargs={"enable_thinking": True}),
        end=marker,
    )
    r2 = rows["think-0-0"]
    cut = text.index(marker)
    assert r2["reasoning"] == text[:cut] and r2["completion"] == text[cut + len(marker) :]
    assert bodies["think-0"].choices[0].message.reasoning_content == text[:cut]


def test_split_reasoning_rules():
    assert split_reasoning("<think>a</think>b", "<think>", "</think>") == ("a", "b")
    assert split_reasoning("\n<think>a</think></think>b", "<think>", "</think>") == ("a", "</think>b")
    assert split_reasoning("a</think>b", "<think>", "</think>", prompt="x<think>\n") == ("a", "b")
    assert split_reasoning("a</think>b", "<think>", "</think>", prompt="x") == (None, "a</think>b")
    assert split_reasoning("<think>still thinking", "<think>", "</think>") == ("still thinking", "")
    assert split_reasoning("answer", "<think>", "</think>", prompt="<think>\n\n</think>\n\n") == (
        None,
        "answer",
    )
