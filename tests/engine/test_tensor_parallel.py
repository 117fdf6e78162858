"""Tensor parallelism over two ranks (gloo on CPU, NCCL on two GPUs) equals the single-process engine."""

import faulthandler
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine import LLM, EngineConfig, ModelLoadError, SamplingParams, build_random_model
from engine.model.lean_load import checkpoint_slice, random_slice
from engine.model.slicing import check_tp_support, slice_model
from engine.parallel.channel import pack, unpack
from tiny_models import hf_greedy, make_config, make_llm, random_prompts, reference_model, tokenizer

ROOT = Path(__file__).resolve().parents[2]
TP = 2
PROMPT_LENS = [40, 70, 5, 17, 33, 1, 25, 60, 9, 12]
MAX_NEW = [12, 9, 15, 10, 20, 7, 14, 6, 18, 11]
# llama: async loop (carry-over on every rank); qwen2: q/k/v bias and tied embeddings; qwen3: q/k norms.
FAMILIES = {"llama": "async", "qwen2": "sync", "qwen3": "sync"}
OPTIONS = dict(num_blocks=128, block_size=8, max_batch_tokens=32, max_num_seqs=8)


@pytest.fixture(scope="module", autouse=True)
def no_hang():
    """A deadlocked collective would block in C++: dump the stacks and exit instead of hanging CI."""
    faulthandler.dump_traceback_later(240, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def tp_llms():
    """One two-rank engine per family, shared by the tests (each start spawns a process)."""
    llms: dict[str, LLM] = {}

    def get(arch: str) -> LLM:
        if arch not in llms:
            llms[arch] = single_llm(arch, tensor_parallel_size=TP)
        return llms[arch]

    yield get
    for llm in llms.values():
        llm.engine.close()


def single_llm(arch: str, **options) -> LLM:
    """The engine of a family's test: a config (per-parameter random weights from the engine seed), or
    for qwen2 a model object (transformers' init; with tensor parallelism its weights travel to rank 1)."""
    if arch == "qwen2":
        model = build_random_model(make_config(arch), "float32", "cpu", seed=0)
        return LLM(model, device="cpu", mode=FAMILIES[arch], **OPTIONS, **options)
    return make_llm(arch, mode=FAMILIES[arch], **OPTIONS, **options)


def token_ids(llm: LLM, prompts, params) -> list[list[list[int]]]:
    return [[o.token_ids for o in out.outputs] for out in llm.generate(prompts, params)]


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_greedy_tp2_equals_one_process_and_transformers(arch, tp_llms):
    llm = tp_llms(arch)
    single = single_llm(arch)
    shard = llm.engine.model.model.layers[0].self_attn
    assert (
        shard.k_proj.weight.shape[0]
        == single.engine.model.model.layers[0].self_attn.k_proj.weight.shape[0] // TP
    )
    assert llm.engine.runner.kv_caches[0][0].shape[2] == make_config(arch).num_key_value_heads // TP

    prompts = random_prompts(len(PROMPT_LENS), PROMPT_LENS, seed=21)
    params = [SamplingParams(temperature=0, max_new_tokens=m) for m in MAX_NEW]
    got = token_ids(llm, prompts, params)
    assert got == token_ids(single, prompts, params)
    ref = reference_model(single)
    for prompt, m, (tokens,) in zip(prompts, MAX_NEW, got, strict=True):
        assert tokens == hf_greedy(ref, prompt, m), f"prompt of {len(prompt)} tokens"
    records = llm.engine.pop_step_records()
    assert len(records) > 20
    assert max(r.prefill_tokens + r.decode_tokens for r in records) <= OPTIONS["max_batch_tokens"]
    assert max(r.num_seqs for r in records) > 1


def test_seeded_sampling_tp2_equals_one_process(tp_llms):
    llm = tp_llms("llama")
    single = make_llm("llama", mode="async", **OPTIONS)
    prompts = random_prompts(6, seed=22)
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_new_tokens=16),
        SamplingParams(temperature=1.0, top_k=20, max_new_tokens=12, min_new_tokens=5),
        SamplingParams(temperature=0.7, min_p=0.05, seed=3, max_new_tokens=20, logprobs=True),
        SamplingParams(temperature=0, max_new_tokens=8),
        SamplingParams(temperature=1.2, seed=11, n=3, max_new_tokens=10),
        SamplingParams(temperature=0.8, top_p=0.5, top_k=5, max_new_tokens=14),
    ]
    got = llm.generate(prompts, params)
    expected = single.generate(prompts, params)
    assert [[o.token_ids for o in r.outputs] for r in got] == [
        [o.token_ids for o in r.outputs] for r in expected
    ]
    lp_got, lp_expected = got[2].outputs[0].logprobs, expected[2].outputs[0].logprobs
    assert lp_got == pytest.approx(lp_expected, abs=1e-4)


def test_top_logprobs_tp2_equal_one_process(tp_llms):
    llm = tp_llms("llama")  # the default limit of 20 alternatives
    single = make_llm("llama", mode="async", **OPTIONS)
    prompts = random_prompts(4, seed=23)
    params = [
        SamplingParams(temperature=0, max_new_tokens=9, top_logprobs=20),
        SamplingParams(temperature=0.9, seed=5, n=2, max_new_tokens=7, top_logprobs=3),
        SamplingParams(temperature=0, max_new_tokens=6),
        SamplingParams(temperature=0.7, seed=2, max_new_tokens=8, top_logprobs=1),
    ]
    got, expected = llm.generate(prompts, params), single.generate(prompts, params)
    for g, e, p in zip(got, expected, params, strict=True):
        for gs, es in zip(g.outputs, e.outputs, strict=True):
            assert gs.token_ids == es.token_ids
            if not p.top_logprobs:
                assert gs.top_token_ids is None
                continue
            assert gs.top_token_ids.shape == (len(gs.token_ids), p.top_logprobs)
            assert (gs.top_token_ids == es.top_token_ids).all()
            np.testing.assert_allclose(gs.top_logprobs, es.top_logprobs, atol=1e-4)


def test_step_inputs_travel_intact():
    from engine.block_manager import BlockManager
    from engine.scheduler import Scheduler
    from engine.sequence import Sequence
    from engine.step_builder import build_step_arrays

    scheduler = Scheduler(BlockManager(64, 8, True), 48, 8)
    for i, n in enumerate([30, 3, 12]):
        params = SamplingParams(
            temperature=0.5 * i, top_p=0.9, min_new_tokens=2, max_new_tokens=5, prompt_logprobs=2 * i - 1
        )  # the second and third score their prompts
        scheduler.add(Sequence(i, str(i), 0, list(range(3, 3 + n)), params, 100 + i, frozenset({2, 9})))
    a = build_step_arrays(scheduler.schedule(), 8, {})
    assert a.num_scored == 2 + 11 and a.score_top_k == 3
    fields, payload = pack(a)
    b = unpack(fields, payload.copy())
    for name, value in vars(a).items():
        other = getattr(b, name)
        assert (other == value).all() if hasattr(value, "shape") else other == value, name
        if hasattr(value, "dtype"):
            assert other.dtype == value.dtype, name


# -- lean construction: meta build, this rank's slices only --------------------------------------


BIG_MLP = {"intermediate_size": 4096}  # projections larger than the embeddings, most of the model


class Allocations(TorchDispatchMode):
    """Storages that operations allocate off the ``meta`` device while active: the largest one and the
    peak of the bytes alive (each counted from its creation until it is freed). A storage made
    elsewhere and attached with ``set_`` (safetensors' memory map of a file) is not an allocation."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = self.live = self.peak = 0
        self.allocated: set[int] = set()
        self.external: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        if key in self.allocated:
            self.allocated.discard(key)
            self.live -= nbytes
        self.external.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            key, size = storage._cdata, storage.nbytes()
            if key in self.allocated or key in self.external:
                continue  # a view, or an in-place result
            if func.overloadpacket is torch.ops.aten.set_:
                self.external.add(key)
            else:
                self.allocated.add(key)
                self.largest = max(self.largest, size)
                self.live += size
                self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, size)
        return out


def lean_model(arch: str, seed: int = 0, **overrides):
    config = make_config(arch, **overrides)
    return build_random_model(config, "float32", "cpu", seed=seed, init="per_parameter")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def assert_shard_of(shard, full_model, rank: int, world: int = TP) -> None:
    """Every parameter of ``shard`` is rank ``rank``'s slice of ``full_model``'s (or all of it)."""
    full = dict(full_model.named_parameters())
    for name, p in shard.named_parameters():
        f = full[name]
        if p.shape != f.shape:
            dim = 0 if p.shape[0] != f.shape[0] else 1
            assert p.shape[dim] * world == f.shape[dim], name
            f = f.narrow(dim, rank * p.shape[dim], p.shape[dim])
        assert torch.equal(p, f), name


def test_tp2_from_a_config_is_the_per_parameter_model_sharded(tp_llms):
    llm = tp_llms("llama")  # LLM(config, tensor_parallel_size=2): built lean on each rank
    full = lean_model("llama")
    assert_shard_of(llm.engine.model, full, rank=0)
    single = LLM(lean_model("llama"), device="cpu", mode="sync", **OPTIONS)
    prompts = random_prompts(4, seed=26)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    got = token_ids(llm, prompts, params)
    assert got == token_ids(single, prompts, params)
    ref = reference_model(single)
    assert [g[0] for g in got] == [hf_greedy(ref, p, 10) for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_a_rank_builds_only_its_slices_with_per_parameter_weights(arch):
    full = lean_model(arch, seed=4, **BIG_MLP)
    largest_param = max(nbytes([p]) for p in full.parameters())
    for rank in range(TP):
        with Allocations() as seen:
            config = make_config(arch, **BIG_MLP)
            shard = random_slice(config, torch.float32, torch.device("cpu"), 4, rank, TP, None)
        assert_shard_of(shard, full, rank)
        layer = shard.model.layers[0]
        assert layer.self_attn.q_proj.weight.shape[0] * TP == full.config.hidden_size
        assert layer.mlp.down_proj.weight.shape[1] * TP == full.config.intermediate_size
        sharded = sum(p.numel() for n, p in full.named_parameters() if "proj" in n)
        whole = sum(p.numel() for n, p in full.named_parameters() if "proj" not in n)
        assert sum(p.numel() for p in shard.parameters()) == whole + sharded // TP
        # One full parameter at a time besides the shard, far from the whole model.
        assert seen.largest <= largest_param
        assert seen.peak <= nbytes(shard.parameters()) + nbytes(shard.buffers()) + largest_param
        assert seen.peak < 0.8 * nbytes(full.parameters())
        assert [n for n, b in shard.named_buffers()] == [n for n, b in full.named_buffers()]
        for (name, b), (_, expected) in zip(shard.named_buffers(), full.named_buffers(), strict=True):
            assert torch.equal(b, expected), name
        if arch == "qwen2":
            assert shard.lm_head.weight is shard.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma", "gemma2", "gemma3"])
def test_per_parameter_init_follows_transformers_and_recomputes_buffers(arch):
    lean, module = lean_model(arch, seed=5), build_random_model(make_config(arch), "float32", "cpu", seed=5)
    assert torch.equal(lean_model(arch, seed=5).lm_head.weight, lean.lm_head.weight)
    assert not torch.equal(lean_model(arch, seed=6).lm_head.weight, lean.lm_head.weight)
    for (name, b), (_, expected) in zip(lean.named_buffers(), module.named_buffers(), strict=True):
        assert b.dtype == expected.dtype and torch.equal(b, expected), name  # rotary inv_freq, embed_scale
    for (name, p), (_, expected) in zip(lean.named_parameters(), module.named_parameters(), strict=True):
        if expected.std() == 0:  # biases, norms (ones, or zeros for Gemma's 1 + weight), the padding row
            assert torch.equal(p, expected), name
        else:
            assert p.std().item() == pytest.approx(expected.std().item(), rel=0.15), name
    embed = lean.model.embed_tokens.weight
    assert not embed[0].any() and embed[1].all()  # pad_token_id 0: transformers zeroes its row
    assert (lean.lm_head.weight is embed) == make_config(arch).tie_word_embeddings
    gpt2 = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(ValueError, match="GPT2LMHeadModel has its own"):
        build_random_model(gpt2, "float32", "cpu", init="per_parameter")
    assert build_random_model(gpt2, "float32", "cpu", init="auto").transformer.wte.weight.shape == (64, 32)


def save_sharded(model, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size="150KB")
    tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    return save_sharded(lean_model("llama", seed=7, **BIG_MLP), tmp_path_factory.mktemp("ckpt") / "llama")


def test_a_sharded_safetensors_checkpoint_loads_per_slice_on_two_ranks(llama_checkpoint):
    single = LLM(str(llama_checkpoint), device="cpu", mode="sync", **OPTIONS)  # from_pretrained, whole
    prompts = random_prompts(5, seed=27)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    expected = token_ids(single, prompts, params)
    tp = LLM(str(llama_checkpoint), device="cpu", mode="sync", tensor_parallel_size=TP, **OPTIONS)
    try:
        assert_shard_of(tp.engine.model, single.engine.model, rank=0)
        assert token_ids(tp, prompts, params) == expected
    finally:
        tp.engine.close()


def test_a_rank_reads_only_its_slices_of_a_checkpoint(llama_checkpoint, monkeypatch):
    import safetensors

    read: dict[str, tuple] = {}
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, path, **kwargs):
            self.handle = real_open(path, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_slice(self, key):
            stored = self.inner.get_slice(key)

            class Slice:
                def get_shape(self):
                    return stored.get_shape()

                def __getitem__(self, index):
                    out = stored[index]
                    read[key] = tuple(out.shape)
                    return out

            return Slice()

        def get_tensor(self, key):
            raise AssertionError(f"{key} read whole")

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    config = transformers.AutoConfig.from_pretrained(llama_checkpoint)
    with Allocations() as seen:
        shard = checkpoint_slice(llama_checkpoint, config, torch.float32, torch.device("cpu"), 1, TP, None)
    params = dict(shard.named_parameters())
    assert read == {k: tuple(params[k].shape) for k in read} and set(read) == set(params)
    largest_whole = max(nbytes([p]) for n, p in params.items() if "proj" not in n)
    largest_shard = max(nbytes([p]) for n, p in params.items() if "proj" in n)
    assert seen.largest <= max(largest_whole, largest_shard)  # no full projection weight, ever
    assert seen.peak <= nbytes(shard.parameters()) + nbytes(shard.buffers())
    monkeypatch.undo()
    assert_shard_of(shard, lean_model("llama", seed=7, **BIG_MLP), rank=1)


def test_a_checkpoint_missing_a_weight_or_with_an_unknown_key_is_refused(llama_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    config = transformers.AutoConfig.from_pretrained(llama_checkpoint)

    def edited(name: str, edit) -> Path:
        target = tmp_path / name
        shutil.copytree(llama_checkpoint, target)
        index = json.loads((target / "model.safetensors.index.json").read_text())
        key = "model.layers.1.mlp.down_proj.weight"
        path = target / index["weight_map"][key]
        tensors = load_file(path)
        edit(tensors, key)
        save_file(tensors, path, metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k != key}
        index["weight_map"].update({k: path.name for k in tensors})
        (target / "model.safetensors.index.json").write_text(json.dumps(index))
        return target

    missing = edited("missing", lambda t, k: t.pop(k))
    with pytest.raises(
        ModelLoadError, match=r"missing from the checkpoint: model\.layers\.1\.mlp\.down_proj\.weight"
    ):
        checkpoint_slice(missing, config, torch.float32, torch.device("cpu"), 0, TP, None)
    extra = edited("extra", lambda t, k: t.update({"model.layers.1.mlp.extra_proj.weight": t[k].clone()}))
    with pytest.raises(
        ModelLoadError, match=r"not parameters of LlamaForCausalLM: model\.layers\.1\.mlp\.extra_proj"
    ):
        checkpoint_slice(extra, config, torch.float32, torch.device("cpu"), 1, TP, None)


def test_heads_not_divisible_by_the_tp_size_are_refused_before_starting():
    with pytest.raises(ValueError, match="num_key_value_heads 1 is not divisible by 2"):
        make_llm("llama", config_overrides={"num_key_value_heads": 1}, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by 3"):
        make_llm("llama", tensor_parallel_size=3)
    gpt2 = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0
    )
    with pytest.raises(ValueError, match="tensor-parallel plan"):
        LLM(gpt2, dtype="float32", device="cpu", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)


def test_a_vocab_parallel_embedding_in_the_plan_stays_replicated():
    # transformers 5.17 adds ``embed_tokens: embedding_rowwise`` to the plan of tied-embedding models.
    config = make_config("qwen2")
    config.base_model_tp_plan = {**config.base_model_tp_plan, "embed_tokens": "embedding_rowwise"}
    model = build_random_model(config, "float32", "cpu")
    slice_model(model, 1, TP, group=None)
    assert model.get_input_embeddings().weight.shape[0] == config.vocab_size
    assert model.model.layers[0].self_attn.q_proj.bias.shape[0] == config.hidden_size // TP
    config.base_model_tp_plan["layers.*.mlp.up_proj"] = "embedding_rowwise"
    with pytest.raises(ValueError, match="up_proj"):
        check_tp_support(config, TP)


def test_followers_exit_when_the_engine_closes(tp_llms):
    llm = tp_llms("qwen3")
    procs = llm.engine.tp.followers.procs
    llm.generate(random_prompts(2, seed=23), SamplingParams(max_new_tokens=3))
    llm.engine.close()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0


def _script_env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited; its parent just has not reaped it
        return f.read().split(")")[-1].split()[0] != "Z"


def test_followers_exit_when_rank0_is_killed(tmp_path):
    script = tmp_path / "rank0.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal
            from engine import SamplingParams
            from tiny_models import make_llm

            if __name__ == "__main__":
                llm = make_llm("llama", tensor_parallel_size=2)
                llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3))
                print(*[p.pid for p in llm.engine.tp.followers.procs], flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)], env=_script_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert pids
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def test_torchrun_style_ranks_load_a_checkpoint(tmp_path):
    """Two processes with torchrun's variables: rank 0 gets the engine, rank 1 serves and exits."""
    checkpoint = tmp_path / "qwen2"
    model = build_random_model(make_config("qwen2"), "float32", "cpu", seed=5)
    model.save_pretrained(checkpoint)
    tokenizer().save_pretrained(checkpoint)
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from engine import EngineConfig, ModelConfig, SamplingParams
            from engine.build import build_engine
            from tiny_models import random_prompts

            cfg = EngineConfig(device="cpu", num_blocks=64, block_size=8, tensor_parallel_size=2)
            engine = build_engine(ModelConfig(model={str(checkpoint)!r}), None, cfg)
            assert os.environ["RANK"] == "0", "only rank 0 gets past build_engine"
            for i, prompt in enumerate(random_prompts(3, seed=24)):
                engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_new_tokens=6))
            outs = []
            while engine.has_unfinished_requests():
                outs += engine.step()
            print(sorted((o.request_id, o.token_ids) for o in outs))
            """
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = _script_env() | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    single = LLM(model, device="cpu", num_blocks=64, block_size=8)
    expected = single.generate(random_prompts(3, seed=24), SamplingParams(temperature=0, max_new_tokens=6))
    assert results[0][0].strip() == str([(str(i), o.outputs[0].token_ids) for i, o in enumerate(expected)])
    assert results[1][0] == ""


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tp2_on_two_gpus_with_cuda_graphs_and_async(dtype):
    options = dict(OPTIONS, max_batch_tokens=64, mode="async", cuda_graphs=True)
    prompts = random_prompts(len(PROMPT_LENS), PROMPT_LENS, seed=25)
    params = [SamplingParams(temperature=0, max_new_tokens=m) for m in MAX_NEW]
    single = make_llm("llama", "cuda", **options)
    expected = token_ids(single, prompts, params)
    single.engine.close()
    del single
    tp = LLM(make_config("llama"), dtype=dtype, device="cuda", tensor_parallel_size=2, **options)
    assert tp.engine.runner.use_graphs and tp.engine.mode == "async"
    got = token_ids(tp, prompts, params)
    tp.engine.close()
    if dtype == "float32":
        assert got == expected
    else:  # bf16 rounding moves logits: the greedy paths agree on most of their length
        agree = [
            next((i for i, (x, y) in enumerate(zip(g[0], e[0], strict=False)) if x != y), len(e[0]))
            for g, e in zip(got, expected, strict=True)
        ]
        assert sum(agree) >= 0.5 * sum(MAX_NEW), agree
