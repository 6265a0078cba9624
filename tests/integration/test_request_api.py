"""The request API on a real engine: logprobs against transformers, seeds, stop strings, n,
streaming (sync and asyncio), abort, close."""

from __future__ import annotations

import asyncio
import pytest
import torch

from framework import LLM, SamplingParams
from framework.testing import watch
from tests.conftest import GREEDY, random_prompts as prompts, reference_model


@pytest.fixture(scope="module")
def llm(tiny_dir):
    engine = LLM(str(tiny_dir), dtype="float32", block_size=8, max_num_tokens=32, **{"kv_cache.max_tokens": 4096})
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return reference_model(tiny_dir)


def test_logprobs_match_transformers(llm, ref):
    prompt = prompts([20])[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=2, **GREEDY), use_tqdm=False)[0]
    completion = out.outputs[0]
    with torch.no_grad():
        full = torch.tensor([prompt + completion.token_ids[:-1]])
        expected = torch.log_softmax(ref(full).logits[0].float(), -1)
    assert len(completion.logprobs) == 6
    for i, (token, position) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = expected[len(prompt) - 1 + i]
        assert token in position and position[token].rank == 1  # greedy picks the top token
        top = row.topk(3)
        assert set(top.indices.tolist()) | {token} == set(position)
        for candidate, lp in position.items():
            assert lp.logprob == pytest.approx(row[candidate].item(), abs=1e-4)
            assert lp.decoded_token == llm.tokenizer.decode([candidate])
    # prompt logprobs: None for the first token, then the prompt tokens' own logprobs (+ top 2)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for position, token in enumerate(prompt[1:], start=1):
        entry = out.prompt_logprobs[position]
        assert entry[token].logprob == pytest.approx(expected[position - 1, token].item(), abs=1e-4)
        assert len(entry) <= 3
        assert entry[token].rank == int((expected[position - 1] > expected[position - 1, token]).sum()) + 1


def test_prompt_logprobs_over_chunked_prefill(llm, ref):
    prompt = prompts([75], seed=1)[0]  # 75 tokens with a 32-token budget: three chunks
    out = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0, **GREEDY), use_tqdm=False)[0]
    with torch.no_grad():
        expected = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    got = torch.tensor([out.prompt_logprobs[p][t].logprob for p, t in enumerate(prompt) if p > 0])
    want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_seeded_requests_reproduce_across_batches(llm):
    target = prompts([9], seed=2)[0]
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate(target, params, use_tqdm=False)[0].outputs[0].token_ids
    others = prompts([5, 30, 12], seed=3)
    noisy = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    crowded = llm.generate(others[:2] + [target] + others[2:], [noisy, noisy, params, noisy], use_tqdm=False)
    assert crowded[2].outputs[0].token_ids == alone
    other_seed = llm.generate(target, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt_blocks(llm):
    prompt = prompts([40], seed=4)[0]
    before = llm.kv_cache_stats.prefix_hit_tokens
    out = llm.generate(prompt, SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # siblings start once the first has its prompt cached: 3 siblings x 4 full blocks of 8 reused
    assert llm.kv_cache_stats.prefix_hit_tokens - before == 3 * 32
    again = llm.generate(prompt, SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert llm.kv_cache_stats.num_used_blocks == 0


def test_stop_strings_cut_the_text(llm):
    prompt = prompts([6], seed=5)[0]
    base = llm.generate(prompt, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) > 12
    stop = text[5:9]  # whatever tokens these characters come from
    cut = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    index = text.find(stop)
    assert cut.text == text[:index]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], include_stop_str_in_output=True, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: index + len(stop)]
    assert kept.token_ids == cut.token_ids and len(cut.token_ids) < len(base.token_ids)


def test_detokenize_false_gives_the_same_tokens_and_no_text(llm):
    prompt = prompts([6], seed=5)[0]
    base = llm.generate(prompt, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    bare = llm.generate(prompt, SamplingParams(max_tokens=12, detokenize=False, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert bare.token_ids == base.token_ids and base.text and bare.text == ""
    with pytest.raises(ValueError, match="need detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False).validate()


def test_min_tokens_masks_stop_tokens(llm):
    prompt = prompts([6], seed=6)[0]
    base = llm.generate(prompt, SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)[0].outputs[0]
    stop_id = base.token_ids[1]
    early = llm.generate(prompt, SamplingParams(max_tokens=10, stop_token_ids=[stop_id], temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert early.token_ids[-1] == stop_id and len(early.token_ids) <= 2
    late = llm.generate(prompt, SamplingParams(max_tokens=10, min_tokens=5, stop_token_ids=[stop_id], temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) >= 5 and stop_id not in late.token_ids[:4]


def test_streaming_pieces_join_to_the_final_text(llm):
    prompt = prompts([7], seed=7)[0]
    params = SamplingParams(max_tokens=30, **GREEDY)
    final = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    texts = [out.outputs[0].text for out in llm.stream(prompt, params)]
    assert len(texts) >= 10
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)
    assert texts[-1] == final.text


def test_closing_a_stream_aborts_and_frees(llm):
    stream = llm.stream(prompts([10], seed=8)[0], SamplingParams(max_tokens=500, **GREEDY))
    for i, out in enumerate(stream):
        if i == 3:
            break
    stream.close()
    llm.executor.step()  # the abort is processed by the next step at the latest
    assert llm.kv_cache_stats.num_used_blocks == 0 and not llm.executor.active


def scheduling_seen(llm):
    """A recorder of what the capacity scheduler sees: request id -> (priority, tenant, ttft_slo_ms)."""
    seen = {}

    def before(active, kv_cache):
        seen.update({r.request_id: (r.priority, r.tenant, r.ttft_slo_ms) for r in active})
        return lambda out: None

    return seen, watch(llm.executor.capacity_scheduler, "schedule", before)


def test_scheduling_metadata_reaches_the_scheduler(llm):
    params = SamplingParams(max_tokens=2, n=2, **GREEDY)
    seen, watching = scheduling_seen(llm)
    with watching:
        outs = llm.generate(prompts([4, 5]), params, priority=[1, -3], tenant=["acme", "globex"], ttft_slo_ms=[250, 1.5], use_tqdm=False)
        (streamed,) = [out for out in llm.stream(prompts([6])[0], params, priority=7, tenant="initech") if out.finished]
        plain = llm.generate(prompts([3])[0], params, use_tqdm=False)[0]

        async def main():
            async for out in llm.generate_async(prompts([5])[0], params, request_id="async-1", tenant="umbrella", ttft_slo_ms=80):
                return out

        asyncio.run(main())
        llm.shutdown()
    first, second = (out.request_id for out in outs)
    expected = {
        f"{first}-0": (1, "acme", 250), f"{first}-1": (1, "acme", 250),  # every completion of a prompt
        f"{second}-0": (-3, "globex", 1.5),
        f"{streamed.request_id}-0": (7, "initech", None),
        f"{plain.request_id}-1": (None, None, None),
        "async-1-0": (None, "umbrella", 80),
    }
    assert {rid: seen[rid] for rid in expected} == expected


def test_bad_scheduling_metadata_raises_before_anything_runs(llm):
    with pytest.raises(ValueError, match=r"^ttft_slo_ms\[1\] must be a finite number of milliseconds > 0"):
        llm.generate(prompts([4, 5]), ttft_slo_ms=[10, 0], use_tqdm=False)
    with pytest.raises(TypeError, match="^tenant must be a str"):
        next(llm.stream(prompts([4])[0], tenant=7))
    assert not llm.executor.has_work()


def test_async_callers_are_batched_and_match_offline(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="float32", **{"kv_cache.max_tokens": 4096})
    batch = prompts([5, 17, 9, 30, 12, 3], seed=9)
    params = SamplingParams(max_tokens=16, **GREEDY)
    offline = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
    steps_before = llm.executor.num_steps

    async def one(prompt):
        pieces = []
        async for out in llm.generate_async(prompt, params, stream=True):
            pieces.append(out)
        return pieces

    async def main():
        return await asyncio.gather(*(one(p) for p in batch))

    try:
        results = asyncio.run(main())
    finally:
        llm.shutdown()
    assert [r[-1].outputs[0].token_ids for r in results] == offline
    assert all(r[-1].finished and not any(x.finished for x in r[:-1]) for r in results)
    assert llm.executor.num_steps - steps_before < 16 * len(batch) / 2  # requests shared steps
    assert llm.kv_cache_stats.num_used_blocks == 0


def test_async_consumer_that_stops_aborts_without_harming_others(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="float32", **{"kv_cache.max_tokens": 4096})
    long_params = SamplingParams(max_tokens=400, **GREEDY)
    short_params = SamplingParams(max_tokens=20, **GREEDY)
    expected = llm.generate(prompts([8], seed=10)[0], short_params, use_tqdm=False)[0].outputs[0].token_ids

    async def quitter():
        async for out in llm.generate_async(prompts([12], seed=11)[0], long_params, stream=True, request_id="quitter"):
            if len(out.outputs[0].token_ids) >= 5:
                break

    async def stayer():
        async for out in llm.generate_async(prompts([8], seed=10)[0], short_params):
            return out

    async def main():
        result = await asyncio.gather(stayer(), quitter())
        await asyncio.sleep(0.2)
        return result[0]

    try:
        out = asyncio.run(main())
    finally:
        llm.shutdown()
    assert out.outputs[0].token_ids == expected and out.outputs[0].finish_reason == "length"
    assert llm.kv_cache_stats.num_used_blocks == 0 and not llm.executor.active


def test_abort_by_id_reports_abort(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="float32", **{"kv_cache.max_tokens": 4096})
    params = SamplingParams(max_tokens=300, **GREEDY)

    async def main():
        seen = []
        async for out in llm.generate_async(prompts([6], seed=12)[0], params, stream=True, request_id="victim"):
            seen.append(out)
            if len(out.outputs[0].token_ids) == 3:
                llm.abort("victim")
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        llm.shutdown()
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert len(seen[-1].outputs[0].token_ids) < 300
    assert llm.kv_cache_stats.num_used_blocks == 0


def test_close_ends_what_runs_and_refuses_what_comes_after(tiny_dir):
    with LLM(str(tiny_dir), dtype="float32", backend="torch", **{"kv_cache.max_tokens": 1024}) as llm:
        stream = llm.stream(prompts([10])[0], SamplingParams(max_tokens=900, **GREEDY))
        assert not next(stream).finished
        llm.start()  # the background loop takes the stream over; close stops it
    *_, last = stream
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert llm._thread is None and llm.kv_cache_stats.num_used_blocks == 0
    llm.close()  # again: nothing left to do
    with pytest.raises(RuntimeError, match="the LLM is closed"):
        llm.generate([5, 6, 7], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)


def test_chat_on_smollm2_uses_the_template():
    llm = LLM(dtype="float32", **{"kv_cache.max_tokens": 2048})
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=20, temperature=0.0))
    assert "Paris" in out.outputs[0].text
    assert out.prompt_token_ids[:1] == llm.tokenizer.encode("<|im_start|>")
    assert out.outputs[0].finish_reason in ("stop", "length")
