"""Bad input gets a clear error, fails alone, and leaks nothing."""

from __future__ import annotations

import pytest

from framework import LLM, SamplingParams
from framework.request import LlmRequest

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", max_model_len=256, **{"kv_cache.max_tokens": 512})


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "prompt is empty"),
        ("", "prompt is empty"),
        ([5] * 300, "maximum length is 256"),
        ([5, 7, 49152], "token ids must lie in [0, 49152)"),
        ([5, -1], "token ids must lie in [0, 49152)"),
    ],
)
def test_bad_prompt_raises_and_engine_keeps_serving(llm, prompt, message):
    good = [5, 6, 7, 8]
    before = llm.generate(good, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    with pytest.raises(ValueError, match=f"prompts.1.: .*{message.replace('[', '.').replace(')', '.')}"):
        llm.generate([good, prompt], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    after = llm.generate(good, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert after[0].outputs[0].token_ids == before[0].outputs[0].token_ids
    assert llm.kv_cache_stats.num_used_blocks == 0
    assert not llm.executor.active


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"), (dict(max_tokens=1.5), "max_tokens")],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_request_larger_than_the_cache_is_rejected(tiny_dir):
    small = LLM(str(tiny_dir), dtype="float32", block_size=16, **{"kv_cache.max_tokens": 64})
    with pytest.raises(ValueError, match="needs 6 KV blocks; the cache has 4"):
        small.generate([5] * 50, SamplingParams(max_tokens=40, **GREEDY), use_tqdm=False)
    assert len(small.generate([5] * 50, SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)[0].outputs[0].token_ids) == 10


def test_bad_request_fails_alone_inside_a_running_batch(llm):
    """Requests reaching the executor directly (as a server's would) are validated one by one."""
    executor = llm.executor
    params = SamplingParams(max_tokens=6, **GREEDY)
    good = [LlmRequest(f"g{i}", [5 + i, 9, 11], params) for i in range(3)]
    bad = LlmRequest("bad", [1, 2, 99999], params)
    for request in (good[0], bad, good[1], good[2]):
        executor.enqueue(request)
    failed = []
    while executor.has_work():
        failed += [r for r in executor.step() if r.error]
    assert failed == [bad] and bad.finish_reason.value == "error" and "token ids" in bad.error
    assert all(len(r.output_token_ids) == 6 and r.finish_reason.value == "length" for r in good)
    expected = llm.generate([r.prompt_token_ids for r in good], params, use_tqdm=False)
    assert [r.output_token_ids for r in good] == [o.outputs[0].token_ids for o in expected]
    assert llm.kv_cache_stats.num_used_blocks == 0


def test_stop_token_ids_and_eos(llm):
    probe = llm.generate([5, 6, 7], SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)[0].outputs[0]
    stop_at = probe.token_ids[3]
    first = probe.token_ids.index(stop_at)
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == probe.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_sampling_is_seeded_and_varies(tiny_dir):
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(str(tiny_dir), dtype="float32", seed=123, **{"kv_cache.max_tokens": 512})
        runs.append([o.outputs[0].token_ids for o in llm.generate([[5, 6, 7]] * 4, params, use_tqdm=False)])
    assert runs[0] == runs[1]  # same engine seed, same outputs
    assert len({tuple(t) for t in runs[0]}) > 1  # different requests draw differently


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(min_tokens=2, stop_token_ids=[99999999]), r"stop_token_ids must lie in \[0, 49152\)"),
        (dict(stop_token_ids=[2**70]), r"stop_token_ids must lie in \[0, 49152\)"),
        (dict(stop_token_ids=[49152]), r"stop_token_ids must lie in \[0, 49152\)"),
    ],
)
def test_what_a_batched_component_indexes_is_checked_against_the_model(llm, params, message):
    good = SamplingParams(max_tokens=4, **GREEDY)
    bad = SamplingParams(max_tokens=4, **GREEDY, **params)
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6, 7]], bad, use_tqdm=False)
    # handed to the executor directly (past the API's check), it fails alone inside a running batch
    executor = llm.executor
    others = [LlmRequest(f"ok{i}", [30 + i, 31], good) for i in range(2)]
    rogue = LlmRequest("rogue", [40, 41], bad)
    for request in (others[0], rogue, others[1]):
        executor.enqueue(request)
    while executor.has_work():
        executor.step()
    assert rogue.finish_reason.value == "error" and "stop_token_ids" in rogue.error
    assert all(r.finish_reason.value == "length" and len(r.output_token_ids) == 4 for r in others)
    assert llm.kv_cache_stats.num_used_blocks == 0


@pytest.mark.parametrize("prompt", [b"hello", {"a": 1}, [1.0, 2.0], [True, False], None, [[1, 2], [3]]])
def test_a_prompt_of_the_wrong_type_is_a_type_error_naming_it(llm, prompt):
    with pytest.raises(TypeError, match=r"prompts?(\[\d\])*"):
        llm.generate([[5, 6], prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.executor.active


def test_sampling_params_as_a_dict_is_a_type_error(llm):
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        llm.generate([5, 6], {"max_tokens": 3}, use_tqdm=False)


@pytest.mark.parametrize(
    "messages, name",
    [([{"content": "hi"}], r"messages\[0\].role"), ([{"role": "user"}], r"messages\[0\].content"), ("hi", "messages"), ([], "messages")],
)
def test_bad_chat_messages_name_the_field(llm, messages, name):
    with pytest.raises((TypeError, ValueError), match=name):
        llm.chat(messages)
