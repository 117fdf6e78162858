"""W3's definition, ``python -m bench.workloads w3``, and the requests transformers is compared on."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bench import workloads
from bench.guided_workload import guided_load
from bench.json_schemas import W2_SCHEMA
from bench.runner import transformers_requests
from bench.workloads import WORKLOADS, cli

TINY_TOKENIZER = str(Path(__file__).resolve().parents[2] / "jobs" / "assets" / "tiny-chat")


def test_w3_is_llama3_8b_shaped_with_varied_lengths():
    w = WORKLOADS["w3"]
    assert w.model == workloads.LLAMA3_8B and w.engine == {"max_num_seqs": 256}
    assert (w.num_requests, w.prompt_len, w.new_tokens) == (1024, (64, 1024), (64, 1024))
    requests = w.requests()
    assert requests == w.requests()  # seed fixed
    assert len(requests) == 1024
    assert all(64 <= len(p) <= 1024 and 64 <= n <= 1024 for p, n in requests)
    assert len({len(p) for p, _ in requests}) > 500 and len({n for _, n in requests}) > 500
    assert w.params(10).ignore_eos and w.params(10).temperature == 0.0
    whole = sum(p.numel() * 2 for p in w.meta_model(torch.bfloat16).parameters())
    assert 16.0e9 < whole < 16.1e9


def test_workloads_cli_takes_w3(monkeypatch):
    seen = []
    monkeypatch.setattr(workloads, "main", lambda *args: seen.append(args) or [])
    cli(["w3", "--modes", "async"])
    assert seen == [("w3", ("async",), 1, None, 0, None, False)]
    cli(["w2s", "--max-num-seqs", "512"])
    assert seen[-1] == ("w2s", ("async", "sync"), 1, 512, 0, None, False)
    cli(["w2", "--top-logprobs", "20", "--modes", "async"])
    assert seen[-1] == ("w2", ("async",), 1, None, 20, None, False)
    cli(["w2", "--batch-invariant"])
    assert seen[-1] == ("w2", ("async", "sync"), 1, None, 0, None, True)


def test_transformers_requests_are_the_first_ones_with_their_own_lengths():
    requests = [([1] * 5, 10), ([2] * 3, 4), ([3] * 7, 30)]
    assert transformers_requests(requests, None, None) == requests
    assert transformers_requests(requests, 2, None) == requests[:2]
    assert transformers_requests(requests, 2, 8) == [([1] * 5, 8), ([2] * 3, 4)]


def test_top_logprobs_workload_reports_its_output_bytes_per_token():
    # smoke (tiny model, CPU): every request asks for 5 alternatives; no logprobs: 4 + 5 x 8 bytes per token.
    (result,) = workloads.main("smoke", ("sync",), top_logprobs=5)
    assert result.generated_tokens > 0 and result.bytes_per_token == 4 + 5 * 8
    w = workloads.with_top_logprobs(WORKLOADS["w2"], 100)
    assert w.params(8).top_logprobs == 100 and w.engine == {"max_num_seqs": 256, "max_top_logprobs": 100}
    (plain,) = workloads.main("smoke", ("sync",))
    assert plain.bytes_per_token == 4


def test_workloads_cli_runs_a_json_schema_on_a_share_of_the_requests():
    pytest.importorskip("xgrammar", reason='the grammar library: pip install -e ".[guided]"')
    tokenizer = TINY_TOKENIZER
    (result,) = cli(
        [
            "smoke",
            "--json-schema",
            "w2",
            "--guided-fraction",
            "0.5",
            "--tokenizer",
            tokenizer,
            "--modes",
            "async",
        ]
    )
    guided = result.guided
    assert guided.rows == 6 and guided.masked_rows > 0 and guided.mask_s > 0
    assert guided.valid_json == guided.complete  # a complete document parses
    plain = [n for i, (_, n) in enumerate(WORKLOADS["smoke"].requests()) if i % 2 == 0]
    assert result.generated_tokens >= sum(plain)  # the unconstrained half keeps its exact lengths


def test_guided_share_of_requests():
    load = guided_load("w2", 0.5, TINY_TOKENIZER)
    assert [load.is_guided(i) for i in range(6)] == [False, True] * 3
    every = guided_load("w2", 1.0, load.tokenizer_dir)
    assert all(every.is_guided(i) for i in range(10))
    params = dataclasses.replace(WORKLOADS["w2"], guided=load).params(30, 1)
    assert params.json_schema == json.dumps(W2_SCHEMA) and not params.ignore_eos
    assert dataclasses.replace(WORKLOADS["w2"], guided=load).params(30, 0).ignore_eos
