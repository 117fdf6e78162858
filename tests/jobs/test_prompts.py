"""Prompt building with the shipped tokenizer's chat template, raw text, templates and bad rows."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engine.sampling_params import SamplingParams
from jobs.config import DataConfig, PromptConfig, SourceFormat
from jobs.errors import JobError
from jobs.pipeline.prompts import PromptBuilder, input_columns, template_fields
from jobs.pipeline.sources import SourceRow
from jobs.tiny_model import ASSETS_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS_DIR)


def builder(tokenizer, prompt=None, **data_kw):
    data = DataConfig(name="t", format=SourceFormat.jsonl, path="x", **data_kw)
    return PromptBuilder(prompt or PromptConfig(), data, SamplingParams(n=2), tokenizer)


def test_text_prompt_becomes_a_user_message_after_the_system_prompt(tokenizer):
    b = builder(tokenizer, PromptConfig(system="Be brief."))
    spec = b.build(SourceRow(0, {"prompt": "Hello?"}), "r0")
    assert spec.error is None
    assert (
        spec.prompt
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert spec.token_ids == tokenizer.encode(spec.prompt, add_special_tokens=False)
    assert spec.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
    ]


def test_raw_text_goes_to_the_model_as_is(tokenizer):
    spec = builder(tokenizer, PromptConfig(chat_template=False)).build(
        SourceRow(0, {"prompt": "Once upon"}), "r"
    )
    assert spec.prompt == "Once upon" and spec.messages is None
    assert spec.token_ids == tokenizer("Once upon").input_ids


def test_messages_keep_their_system_prompt_and_drop_a_trailing_answer(tokenizer):
    b = builder(tokenizer, PromptConfig(system="ignored"), messages_column="messages", prompt_column=None)
    messages = [
        {"role": "system", "content": "Own system."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "old answer"},
    ]
    spec = b.build(SourceRow(3, {"messages": messages}), "r3")
    assert spec.messages == messages[:2]
    assert "old answer" not in spec.prompt and spec.prompt.endswith("<|im_start|>assistant\n")


def test_messages_column_falls_back_to_the_prompt_column(tokenizer):
    b = builder(tokenizer, messages_column="messages", prompt_column="prompt")
    assert b.build(SourceRow(0, {"messages": None, "prompt": "P"}), "x").messages == [
        {"role": "user", "content": "P"}
    ]


@pytest.mark.parametrize(
    "row,error",
    [
        ({"prompt": None}, "prompt column 'prompt' is missing or null"),
        ({}, "prompt column 'prompt' is missing or null"),
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": ["a"]}, "must be text, got list"),
        ({"messages": "hi"}, "messages must be a list"),
        ({"messages": []}, "the chat has no messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "chat message 0 has unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "chat message 0 content must be a string"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "no content to answer"),
    ],
)
def test_bad_rows_get_an_error_naming_the_problem(tokenizer, row, error):
    b = builder(tokenizer, messages_column="messages")
    spec = b.build(SourceRow(0, row), "r")
    assert error in spec.error and spec.token_ids is None


def test_template_over_fields(tokenizer):
    b = builder(tokenizer, PromptConfig(template="Write a {style} about {topic}.", chat_template=False))
    assert b.build(SourceRow(0, {"style": "poem", "topic": "snow"}), "r").prompt == "Write a poem about snow."
    assert "'topic' is missing or null" in b.build(SourceRow(1, {"style": "poem"}), "r").error
    assert template_fields("{a} and {b.x} and {a}") == ["a", "b"]
    with pytest.raises(JobError, match="named fields"):
        template_fields("{} and {0}")


def test_per_row_sampling_overrides_are_validated(tokenizer):
    b = builder(tokenizer)
    spec = b.build(SourceRow(0, {"prompt": "x"}, sampling={"temperature": 0.0, "max_new_tokens": 9}), "r")
    assert spec.error is None and spec.params.temperature == 0.0 and spec.params.n == 2
    bad = b.build(SourceRow(0, {"prompt": "x"}, sampling={"temperature": -1}), "r")
    assert "temperature must be >= 0" in bad.error


def test_row_id_is_the_id_column_or_the_row_index(tokenizer):
    assert builder(tokenizer).row_id(SourceRow(17, {"prompt": "x"})) == "17"
    assert builder(tokenizer, id_column="uid").row_id(SourceRow(17, {"uid": 5})) == "5"


def test_column_settings_are_checked_at_start(tokenizer):
    data = DataConfig(name="t", path="x", prompt_column=None, messages_column=None)
    with pytest.raises(JobError, match="set data.prompt_column"):
        input_columns(PromptConfig(), data)
    data = DataConfig(name="t", path="x", messages_column="messages", id_column="uid")
    with pytest.raises(JobError, match="chat messages need the chat template"):
        input_columns(PromptConfig(chat_template=False), data)
    assert input_columns(PromptConfig(), data) == ["uid", "messages", "prompt"]


def test_tokenizer_without_chat_template_is_refused_at_start(tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(JobError, match="no chat template"):
        builder(NoTemplate())
