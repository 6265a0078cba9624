"""Decode steps replayed from recorded CPU graphs (framework_cpu_kernels/graphs.py): a replay
computes from the new inputs, a collective of torch.distributed is replayed at its place, a step
whose effects a replay cannot repeat is never replayed, and the engine's outputs are the same with
the graphs as without."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from cpu_kernels_checks import require_kernels

import framework
import framework_cpu_kernels
from framework import LLM, SamplingParams
from framework.distributed.launch import free_port
from framework_cpu_kernels.backend import KernelDecodeGraphs
from framework_cpu_kernels.graphs import CPUDecodeGraphs, CPUGraph, record
from tests.conftest import GREEDY, random_prompts


def test_a_replay_recomputes_kernels_and_torch_ops_from_new_inputs(kernels):
    x = torch.randn(4, 64)
    weight = torch.randn(32)

    def step():
        h = kernels.silu_and_mul(x * 2)  # a PyTorch op, then a kernel on its output
        return kernels.rms_norm(h.view(4, 32), weight, 1e-6)  # a view, then a kernel

    graph = record(kernels, step, [x])
    assert graph.replayable
    assert [e[0] for e in graph.entries] == ["torch", "kernel", "kernel"]  # the view is not an entry
    assert torch.equal(graph.output, step())

    fresh = torch.randn(4, 64)
    expected = kernels.rms_norm(kernels.silu_and_mul(fresh * 2), weight, 1e-6)
    out = graph.replay([fresh])
    assert out.data_ptr() == graph.output.data_ptr()  # the graph's own output, overwritten
    assert torch.equal(out, expected)
    assert torch.equal(x, fresh)  # the recorded input now holds the new one


def test_a_recording_takes_only_its_own_threads_work(kernels):
    x, other = torch.randn(4, 64), torch.randn(4, 64)

    def step():
        beside = threading.Thread(target=lambda: kernels.silu_and_mul(other * 2))
        beside.start()
        beside.join()
        return kernels.silu_and_mul(x)

    graph = record(kernels, step, [x])
    assert [e[0] for e in graph.entries] == ["kernel"]


def test_in_place_ops_are_replayed(kernels):
    x = torch.zeros(8)
    graph = record(kernels, lambda: x.add_(1), [])
    assert [e[0] for e in graph.entries] == ["torch"]
    graph.replay([])
    assert torch.equal(x, torch.full((8,), 2.0))


RANK = """
import sys, torch, torch.distributed as dist
from framework_cpu_kernels.graphs import record
from framework_cpu_kernels.kernels import load
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
x = torch.full((2,), rank + 1.0)

def step():
    y = x * 2
    dist.all_reduce(y)
    return y + 1

graph = record(load(), step, [x])
print(graph.replayable, [e[0] for e in graph.entries], graph.output.tolist(), graph.replay([x * 10]).tolist())
"""


def test_a_collective_is_replayed_at_its_place(kernels):
    paths = [str(Path(m.__file__).parents[1]) for m in (framework, framework_cpu_kernels)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}
    init = f"tcp://127.0.0.1:{free_port()}"
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(r), init], env=env, stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        printed = [rank.communicate(timeout=120)[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    # recorded: 2 * 1 + 2 * 2 + 1; replayed on inputs 10 and 20: 2 * 10 + 2 * 20 + 1
    assert printed == ["True ['torch', 'collective', 'torch'] [7.0, 7.0] [61.0, 61.0]\n"] * 2


@pytest.mark.parametrize(
    "step",
    [
        lambda x: x * torch.tensor([1.0, 2.0]),  # a tensor made from Python data
        lambda x: x * float(x.sum()),  # a value read back into Python
    ],
    ids=["tensor-from-python", "item"],
)
def test_a_step_a_replay_cannot_repeat_is_run_eagerly(kernels, step):
    x = torch.ones(2)
    graph = record(kernels, lambda: step(x), [x])
    assert not graph.replayable

    graphs = CPUDecodeGraphs(kernels, kv_caches=None)
    calls = []

    def counted():
        calls.append(1)
        return step(x)

    for _ in range(4):
        graphs.run(("key",), counted, [x])
    assert graphs.graphs[("key",)] is None
    assert len(calls) == 4  # every step ran as it is


def test_a_key_is_recorded_the_second_time_it_is_seen_and_the_oldest_dropped(kernels):
    x = torch.ones(3)
    graphs = CPUDecodeGraphs(kernels, kv_caches=None, capacity=2)
    calls = []

    def step():
        calls.append(1)
        return x * 3

    graphs.run("a", step, [x])
    graphs.run("b", step, [x])  # keys seen once: nothing recorded
    assert not graphs.graphs
    graphs.run("b", step, [x])  # seen again: recorded (and run for real)
    graphs.run("a", step, [x])  # (not in a row: verify steps alternate between query lengths)
    assert list(graphs.graphs) == ["b", "a"] and len(calls) == 4
    assert torch.equal(graphs.run("b", step, [torch.full((3,), 2.0)]), torch.full((3,), 6.0))
    assert len(calls) == 4  # replayed: `step` itself did not run
    for key in ("c", "c", "d", "d"):
        graphs.run(key, step, [x])
    assert list(graphs.graphs) == ["c", "d"]  # capacity 2: "b" and "a" dropped
    graphs.run("e", step, [x])
    for key in range(8):  # a key seen once is forgotten after 4 x capacity others
        graphs.run(key, step, [x])
    graphs.run("e", step, [x])
    assert "e" not in graphs.graphs


def _generate(llm, prompts, max_tokens):
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_outputs_are_the_same_with_the_graphs(kernels, plugins, tiny_dir, dtype, monkeypatch):
    require_kernels(getattr(torch, dtype))
    options = {"kv_cache.max_tokens": 4096, "kv_cache.block_size": 8, "model.dtype": dtype, "engine.backend": "cpu_kernels"}
    # requests finishing at different steps (the batch shrinks), contexts crossing blocks, two
    # sharing a prefix
    prefix = random_prompts([24], seed=8)[0]
    prompts = random_prompts([3, 9, 17, 30], seed=7) + [prefix + [5, 6], prefix + [7]]
    max_tokens = [20, 6, 13, 9, 12, 12]
    expected = _generate(LLM(str(tiny_dir), plugins=plugins, **options, **{"engine.cpu_graphs": False}), prompts, max_tokens)

    llm = LLM(str(tiny_dir), plugins=plugins, **options)
    kv = llm.executor.kv_cache_manager
    graphs = llm.executor.model_engine.backend.decode_graphs(None, kv.get_kv_caches(), kv.block_size, 1024)
    assert isinstance(graphs, KernelDecodeGraphs)  # the default
    replays = []
    original = CPUGraph.replay
    monkeypatch.setattr(CPUGraph, "replay", lambda self, inputs: replays.append(1) or original(self, inputs))
    assert _generate(llm, prompts, max_tokens) == expected
    assert len(replays) >= 5
    kv = llm.executor.kv_cache_manager
    assert kv.num_free_blocks == kv.get_max_resource_count()


def test_graphs_are_off_when_asked(kernels, plugins, tiny_dir):
    engine = LLM(str(tiny_dir), plugins=plugins, **{"engine.backend": "cpu_kernels", "engine.cpu_graphs": False}).executor.model_engine
    assert engine.backend.decode_graphs(engine.model, [], 16, 1024) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_steps_replay_from_graphs_with_the_same_tokens(kernels, plugins, tiny_dir, dtype, monkeypatch):
    require_kernels(getattr(torch, dtype))
    options = {"kv_cache.max_tokens": 4096, "kv_cache.block_size": 8, "model.dtype": dtype, "engine.backend": "cpu_kernels"}
    prompts = random_prompts([5, 19], seed=4)
    max_tokens = [24, 24]
    expected = _generate(LLM(str(tiny_dir), plugins=plugins, **options, **{"engine.cpu_graphs": False}), prompts, max_tokens)

    # the model as its own draft: every greedy draft is accepted, so steps verify 1 + 4 tokens
    llm = LLM(str(tiny_dir), plugins=plugins, speculative="draft_model", **{"speculative.model.path": str(tiny_dir)}, **options)
    query_lens, replays = [], []
    run, replay = KernelDecodeGraphs.run, CPUGraph.replay
    monkeypatch.setattr(KernelDecodeGraphs, "run", lambda self, *args: query_lens.append(args[3]) or run(self, *args))
    monkeypatch.setattr(CPUGraph, "replay", lambda self, inputs: replays.append(1) or replay(self, inputs))
    assert _generate(llm, prompts, max_tokens) == expected
    assert llm.speculation_stats.accepted_tokens > 0
    recorded = llm.executor.model_engine._graphs[1].graphs.graphs  # the target's: key -> graph
    assert max(query_lens) == 5 and any(key[1] == 5 and graph is not None for key, graph in recorded.items())
    assert replays
    kv = llm.executor.kv_cache_manager
    assert kv.num_free_blocks == kv.get_max_resource_count()
