"""One LLM used from several places at once without its background loop: interleaved streams and
generate calls, several threads, and a caller interrupted mid-generation."""

from __future__ import annotations

import threading

import pytest

from framework import LLM, SamplingParams
from tests.conftest import random_prompts

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", **{"kv_cache.max_tokens": 1024})


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([5, 9, 14, 7], seed=3)


@pytest.fixture(scope="module")
def expected(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)]


def test_a_half_consumed_stream_survives_a_generate_call(llm, prompts, expected):
    stream = llm.stream(prompts[0], PARAMS)
    first = next(stream)
    assert not first.finished and len(first.outputs[0].token_ids) == 1
    others = llm.generate(prompts[1:], PARAMS, use_tqdm=False)  # steps the stream's request too
    assert [o.outputs[0].token_ids for o in others] == expected[1:]
    rest = list(stream)
    assert rest[-1].finished and rest[-1].outputs[0].token_ids == expected[0]
    assert llm.kv_cache_stats.num_used_blocks == 0


def test_two_threads_generating_at_once_both_get_their_results(llm, prompts, expected):
    results, errors = {}, []

    def caller(name, batch):
        try:
            results[name] = [o.outputs[0].token_ids for o in llm.generate(batch, PARAMS, use_tqdm=False)]
        except Exception as exc:  # reported below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=("a", prompts[:2])), threading.Thread(target=caller, args=("b", prompts[2:]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and results == {"a": expected[:2], "b": expected[2:]}
    assert llm.kv_cache_stats.num_used_blocks == 0 and not llm.executor.active


def test_ctrl_c_during_generate_aborts_its_requests(llm, prompts, expected, monkeypatch):
    decoder = llm.executor.decoder
    real = decoder.decode
    calls = {"n": 0}

    def interrupted(requests, logits):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(requests, logits)

    monkeypatch.setattr(decoder, "decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, PARAMS, use_tqdm=False)
    assert llm.kv_cache_stats.num_used_blocks == 0
    assert not llm.executor.active  # aborted: nothing left to run or to hold blocks
    monkeypatch.undo()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)] == expected
