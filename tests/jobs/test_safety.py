"""Safety: no remote code unless asked, chat templates in transformers' sandbox, nothing from the data becomes a path."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from jobs.generate import model_config, output_dir, run_generation
from jobs.tiny_model import ASSETS_DIR
from jobs_helpers import compose_config, fake_factory, read_rows, rows_by_custom_id


def config(root, *overrides):
    return compose_config([f"output_root={root}", "runner.progress=false", *overrides])


@pytest.mark.parametrize("model", [[], ["model=hf", "model.model=some/checkpoint"]])
def test_trust_remote_code_is_off_unless_set(tmp_path, model):
    assert model_config(config(tmp_path, *model)).trust_remote_code is False
    assert model_config(config(tmp_path, *model, "model.trust_remote_code=true")).trust_remote_code is True


@pytest.mark.parametrize(
    "payload",
    [
        "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
        "{{ joiner.__init__.__globals__['os'].popen('touch MARKER').read() }}",
        "{{ namespace.__init__.__globals__.__builtins__['open']('MARKER', 'w') }}",
    ],
)
def test_chat_template_reaching_python_internals_fails_for_that_row_only(tmp_path, payload):
    marker = tmp_path / "escaped"
    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR)
    attack = payload.replace("MARKER", str(marker))
    tokenizer.chat_template = (
        "{% if messages[-1]['content'] == 'attack' %}" + attack + "{% endif %}" + tokenizer.chat_template
    )
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello", "attack", "world"]))
    cfg = config(
        tmp_path, "data=jsonl", f"data.path={path}", "job.sampling.n=1", "job.sampling.max_new_tokens=4"
    )
    run_generation(cfg, make_engine=fake_factory(tokenizer=tokenizer)[1])
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))
    assert rows["0-0"]["error"] is None and rows["2-0"]["error"] is None
    assert rows["1-0"]["error"].startswith("cannot render the chat template: SecurityError")
    assert not marker.exists()


def test_ids_that_look_like_paths_stay_data(tmp_path):
    ids = ["../../etc/x", "/abs/path", "a/b/c", "..", "./chunk-000001.arrow", "c:\\win"]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": "p"}) + "\n" for i in ids))
    root = tmp_path / "out"
    cfg = config(root, "data=jsonl", f"data.path={path}", "data.id_column=id", "job.sampling.n=2")
    run_generation(cfg, make_engine=fake_factory()[1])
    assert sorted({r["id"] for r in read_rows(output_dir(cfg))}) == sorted(ids)
    written = {p.relative_to(output_dir(cfg)).as_posix() for p in root.rglob("*") if p.is_file()}
    assert written == {
        ".lock",
        "config.yaml",
        "manifest.json",
        "generations/chunk-000001.arrow",
        "steps/steps-000001.arrow",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "rows.jsonl"]
