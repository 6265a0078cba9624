"""The `cpu_kernels` backend under tensor parallelism (gloo): TP=2 on a tiny random Llama (2 query
heads and 1 KV head per rank) against TP=1 with the same backend, greedy token for token and
float32 logprobs within 1e-5, on a mixed batch with chunked prefill and prefix reuse; eagerly, and
with decode steps replayed from CPU graphs (their all-reduces and gather replayed with them). The
ranks other than 0 find the plugin through its entry point, as an installed engine's do."""

from __future__ import annotations

import importlib.metadata as metadata

import pytest

from framework import SamplingParams
from framework_cpu_kernels.graphs import CPUGraph
from tests.conftest import GREEDY, make_tiny_checkpoint, random_prompts
from tests.integration.test_tensor_parallel import assert_logprobs_close, make_llm, run_mixed


@pytest.fixture(scope="module")
def tiny(kernels, tmp_path_factory, tokenizer_dir):
    if not metadata.entry_points(group="framework.plugins", name="framework_cpu_kernels"):
        pytest.skip("framework-cpu-kernels is not installed: the other ranks would not find the backend")
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp-kernels"), tokenizer_dir, seed=5, random_vectors=True)


def outputs(llm):
    """Greedy tokens and logprobs of a mixed batch, then prompt logprobs of fresh prompts."""
    try:
        mixed = run_mixed(llm, SamplingParams(max_tokens=12, logprobs=5, **GREEDY))
        scored = llm.generate(random_prompts([6, 50, 23], seed=6), SamplingParams(max_tokens=1, prompt_logprobs=5, **GREEDY), use_tqdm=False)
        return [o.outputs[0] for o in mixed], [o.prompt_logprobs[1:] for o in scored]
    finally:
        llm.executor.model_engine.close()


def assert_same(one, two):
    for a, b in zip(one[0], two[0], strict=True):
        assert b.token_ids == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert_logprobs_close(x, y)
    for a, b in zip(one[1], two[1], strict=True):
        for x, y in zip(a, b, strict=True):
            assert_logprobs_close(x, y)


@pytest.fixture(scope="module")
def tp1(plugins, tiny):
    return outputs(make_llm(tiny, 1, plugins=plugins, backend="cpu_kernels", **{"engine.cpu_graphs": False}))


def test_tp2_matches_tp1_with_the_kernels(plugins, tiny, tp1):
    llm = make_llm(tiny, 2, plugins=plugins, backend="cpu_kernels", **{"engine.cpu_graphs": False})
    assert llm.executor.model_engine.backend.name == "cpu_kernels"
    assert_same(tp1, outputs(llm))


def test_tp2_replays_decode_steps_from_cpu_graphs(plugins, tiny, tp1, monkeypatch):
    replays = []
    replay = CPUGraph.replay
    monkeypatch.setattr(CPUGraph, "replay", lambda self, inputs: replays.append(1) or replay(self, inputs))
    llm = make_llm(tiny, 2, plugins=plugins, backend="auto")  # (graphs on: the default)
    assert llm.executor.model_engine.backend.name == "cpu_kernels"  # auto chooses as in one process
    assert_same(tp1, outputs(llm))
    assert len(replays) >= 5  # rank 0's: their collectives met rank 1's, or the logits would differ
