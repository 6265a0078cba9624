"""Tensor parallelism on CPU (gloo): TP=2 on tiny random Llama and Qwen 3 checkpoints against TP=1
(logprobs of every sampled and prompt position within 1e-5 in float32, greedy and seeded sampling
token for token, mixed batches with chunked prefill and prefix reuse), one KV head replicated on
both ranks (MQA), a draft model on rank 0 beside a TP=2 target, plugins given to `LLM` reaching
the other ranks, every rank's decode steps through the CUDA graphs' padded path (run eagerly),
TP=3 on SmolLM2-135M, a closed LLM's ranks gone, and a rank killed or hung mid-run: the caller
gets an error, no process is left."""

from __future__ import annotations

import os
import signal
import time

import pytest

from framework import LLM, SamplingParams
from framework.plugins.hookspecs import hookimpl
from tests.conftest import GREEDY, make_tiny_checkpoint, random_prompts

ATOL = 1e-5
FAMILIES = {"llama": dict(family="llama"), "qwen3": dict(family="qwen3", head_dim=16)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer_dir, seed=5, random_vectors=True, **FAMILIES[request.param])


def make_llm(path, tp: int, **options):
    options = {"kv_cache.max_tokens": 2048, "max_num_tokens": 24, "block_size": 8, "backend": "torch", **options}
    return LLM(str(path), dtype="float32", tensor_parallel_size=tp, num_threads=1, **options)


def workers(llm):
    """The rank processes the LLM's engine started."""
    return list(llm.executor.model_engine.ranks.workers.processes.values())


def run_mixed(llm, params):
    """A shared prefix cached by a first call, then a mixed batch (prefix hits, long and short prompts
    under a 24-token budget: chunked prefill beside decode rows)."""
    shared = random_prompts([40], seed=2)[0]
    llm.generate([shared + [7, 8, 9]], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    prompts = [shared + own for own in random_prompts([3, 11], seed=4)] + random_prompts([5, 60, 2, 33], seed=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.kv_cache_stats.prefix_hit_tokens == 2 * 40
    return outs


def assert_logprobs_close(a, b):
    assert a.keys() == b.keys()
    for token in a:
        assert abs(a[token].logprob - b[token].logprob) <= ATOL


def greedy_and_logprobs(path, tp: int, **options):
    """The mixed batch's greedy tokens with their top logprobs, and the prompt logprobs of three prompts."""
    with make_llm(path, tp, **options) as llm:
        mixed = run_mixed(llm, SamplingParams(max_tokens=12, logprobs=5, **GREEDY))
        prompts = random_prompts([6, 50, 23], seed=6)  # (prompt logprobs bypass the prefix cache)
        scored = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=5, **GREEDY), use_tqdm=False)
        return mixed, scored, llm.executor.model_engine.kv_cache_spec()


def assert_same_greedy_and_logprobs(one, two):
    for a, b in zip(one[0], two[0], strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert_logprobs_close(x, y)
    for a, b in zip(one[1], two[1], strict=True):
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert_logprobs_close(x, y)


def test_tp2_matches_tp1_greedy_and_logprobs(tiny):
    assert_same_greedy_and_logprobs(greedy_and_logprobs(tiny, 1), greedy_and_logprobs(tiny, 2))


def test_tp2_replicates_a_single_kv_head(tmp_path_factory, tokenizer_dir):
    # MQA (4 query heads, 1 KV head): each rank keeps 2 query heads and its own copy of the KV head
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("mqa"), tokenizer_dir, seed=5, random_vectors=True, num_key_value_heads=1)
    one, two = greedy_and_logprobs(path, 1), greedy_and_logprobs(path, 2)
    assert two[2].num_kv_heads == 1  # rank 0's cache: its copy of the KV head
    assert_same_greedy_and_logprobs(one, two)


def test_tp2_sampling_with_seeds_matches_tp1(tiny):
    params = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=s, ignore_eos=True) for s in range(6)]
    results = {}
    for tp in (1, 2):
        with make_llm(tiny, tp) as llm:
            results[tp] = [o.outputs[0].token_ids for o in run_mixed(llm, params)]
    assert results[2] == results[1]


def test_a_draft_model_runs_on_rank_0_beside_a_tp2_target(tmp_path_factory, tokenizer_dir):
    """`speculative=draft_model` with a tensor-parallel target: the draft runs unsharded in rank 0's
    process, the verify steps go to both ranks, and greedy output is the target's own (TP=1, no drafts)."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("target"), tokenizer_dir, seed=5, random_vectors=True)
    params = SamplingParams(max_tokens=12, **GREEDY)
    with make_llm(path, 1) as plain:
        want = [o.outputs[0].token_ids for o in run_mixed(plain, params)]
    drafting = {"speculative": "draft_model", "speculative.model.path": str(path), "speculative.num_tokens": 3}
    with make_llm(path, 2, **drafting) as llm:
        assert llm.executor.drafter.engine.ranks is None and llm.executor.model_engine.ranks.tp.size == 2
        assert [o.outputs[0].token_ids for o in run_mixed(llm, params)] == want
        counters = llm.executor.counters
        assert counters.verify_steps > 0 and counters.accepted_draft_tokens == counters.draft_tokens > 0  # its own draft: every one accepted


def test_plugins_given_to_llm_reach_the_other_ranks(tmp_path_factory, tokenizer_dir):
    """A backend known only from `LLM(plugins=...)` (a module, not installed) runs on every rank;
    an object whose class no other process can import is refused with a clear error."""
    from framework.plugins.manager import create_plugin_manager
    from tests.integration import renamed_torch_backend

    tiny = make_tiny_checkpoint(tmp_path_factory.mktemp("plugins"), tokenizer_dir, seed=5, random_vectors=True)
    plugins = create_plugin_manager([renamed_torch_backend])
    params = SamplingParams(max_tokens=8, **GREEDY)
    with make_llm(tiny, 1) as plain:
        want = [o.outputs[0].token_ids for o in run_mixed(plain, params)]
    with make_llm(tiny, 2, backend="renamed_torch", plugins=plugins) as llm:
        assert llm.config.engine.backend == "renamed_torch"  # (a rank that did not know it would fail to start)
        assert [o.outputs[0].token_ids for o in run_mixed(llm, params)] == want

    class Local:  # defined in a function: no other process can import it
        @hookimpl
        def register_backends(self, register):
            register("local_torch", "framework.backend.torch_backend:TorchBackend")

    with pytest.raises(ValueError, match="must be a module, or an object of a class defined at a module's top level"):
        make_llm(tiny, 2, backend="torch", plugins=create_plugin_manager([Local()]))


def test_tp2_decode_steps_through_the_cuda_graphs_padded_path_match_tp1(tmp_path, tokenizer_dir, monkeypatch):
    """Every rank runs its decode steps as the CUDA graphs record them under tensor parallelism (the
    padded step, here eagerly, then the LM head on the requests' rows), in the same buckets at the
    same steps; the output is TP=1's."""
    from framework.plugins.manager import create_plugin_manager
    from tests.integration import padded_torch_backend

    path = make_tiny_checkpoint(tmp_path / "tiny", tokenizer_dir, seed=5, random_vectors=True)
    log = tmp_path / "steps"
    monkeypatch.setenv(padded_torch_backend.LOG, str(log))  # (the ranks inherit it)
    one = greedy_and_logprobs(path, 1)
    two = greedy_and_logprobs(path, 2, backend="padded_torch", plugins=create_plugin_manager([padded_torch_backend]))
    assert_same_greedy_and_logprobs(one, two)
    steps = [[tuple(map(int, line.split())) for line in (tmp_path / f"steps.{rank}").read_text().splitlines()] for rank in (0, 1)]
    assert steps[1] == steps[0]
    assert {b for b, _, _ in steps[0]} >= {8, 4, 1} and len({w for _, w, _ in steps[0]}) >= 2
    assert any(n < b for b, _, n in steps[0])  # (padding rows)


def test_tp3_smollm2_greedy_matches_tp1(smol_dir):
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    results = {}
    for tp in (1, 3):
        with LLM(str(smol_dir), dtype="float32", backend="torch", tensor_parallel_size=tp, num_threads=1, **{"kv_cache.max_tokens": 1024}) as llm:
            results[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert results[3] == results[1]


def test_closing_a_tp2_llm_ends_its_ranks(tmp_path_factory, tokenizer_dir):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tp-close"), tokenizer_dir, seed=1)
    with make_llm(path, 2) as llm:
        processes = workers(llm)
        assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)[0].finished
    assert [p.poll() for p in processes] == [0]  # stopped by rank 0 and waited for, not killed
    llm.close()  # again: nothing left to do
    with pytest.raises(RuntimeError, match="the LLM is closed"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)


def assert_gone(processes, within: float = 10.0):
    deadline = time.monotonic() + within
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(p.poll() is not None for p in processes)


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_rank_that_dies_or_hangs_fails_the_requests_and_leaves_no_process(tmp_path_factory, tokenizer_dir, fault):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tp-fault"), tokenizer_dir, seed=1)
    llm = make_llm(path, 2, distributed_timeout=3.0)
    processes = workers(llm)
    stream = llm.stream(random_prompts([20])[0], SamplingParams(max_tokens=200, **GREEDY))
    first = next(stream)
    assert not first.finished
    os.kill(processes[0].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    *_, last = stream
    assert last.finished and last.outputs[0].finish_reason == "error"
    assert "tensor-parallel" in last.error and ("rank 1" in last.error or fault == "hang")
    assert_gone(processes)
    again = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)[0]
    assert again.outputs[0].finish_reason == "error" and "tensor-parallel" in again.error
    llm.close()


def test_workers_exit_when_rank_0_is_killed(tmp_path_factory, tokenizer_dir):
    import subprocess
    import sys
    from pathlib import Path

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tp-orphans"), tokenizer_dir, seed=1)
    script = (
        "import sys, time\n"
        "from framework import LLM\n"
        f"llm = LLM({str(path)!r}, dtype='float32', backend='torch', tensor_parallel_size=2, num_threads=1, **{{'kv_cache.max_tokens': 512}})\n"
        "print(*[p.pid for p in llm.executor.model_engine.ranks.workers.processes.values()], flush=True)\n"
        "time.sleep(600)\n"
    )
    checkout = str(Path(__file__).parents[2])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([checkout, os.environ.get("PYTHONPATH", "")])}
    rank0 = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in rank0.stdout.readline().split()]
        assert pids
    finally:
        rank0.kill()
        rank0.wait()
    deadline = time.monotonic() + 10
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _running(pid)]


def _running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie, unreaped by its dead parent, has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
