"""Greedy output of the engine against transformers `generate` on the same weights (fp32), on the
built-in `torch` backend and on the one `engine.backend=auto` picks (the C++ kernels where their
plugin is installed and the CPU runs them)."""

from __future__ import annotations

import pytest

from framework import LLM, SamplingParams
from tests.conftest import GREEDY, assert_greedy_match, random_prompts, reference_model


@pytest.fixture(scope="module")
def tiny_ref(tiny_dir):
    return reference_model(tiny_dir)


@pytest.fixture(scope="module", params=["torch", "auto"])
def backend(request):
    return request.param


def make_llm(path, backend, **options):
    return LLM(str(path), dtype="float32", backend=backend, **options)


def check_all(ref, prompts, outputs, max_tokens):
    for prompt, out in zip(prompts, outputs):
        assert out.finished and out.outputs[0].finish_reason == "length"
        assert_greedy_match(ref, prompt, out.outputs[0].token_ids, max_tokens)


def test_single_prompts_match(backend, tiny_dir, tiny_ref):
    llm = make_llm(tiny_dir, backend, **{"kv_cache.max_tokens": 2048})
    for prompt in random_prompts([1, 7, 16, 33]):
        out = llm.generate(prompt, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)
        check_all(tiny_ref, [prompt], out, 24)
    assert llm.kv_cache_stats.num_used_blocks == 0


@pytest.mark.parametrize("micro_batch", ["fcfs", "equal_progress"])
def test_mixed_batch_with_chunked_prefill_matches(backend, tiny_dir, tiny_ref, micro_batch):
    # A 24-token budget forces every long prompt to be computed over several steps, mixed with
    # the decode tokens of the requests that already started.
    llm = make_llm(tiny_dir, backend, max_num_tokens=24, **{"kv_cache.max_tokens": 2048, "scheduler.micro_batch": micro_batch})
    prompts = random_prompts([5, 60, 17, 41, 3, 90], seed=1)
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)
    check_all(tiny_ref, prompts, outs, 20)
    assert llm.executor.num_steps > 20 + max(len(p) for p in prompts) // 24
    assert llm.kv_cache_stats.num_used_blocks == 0


def test_prefix_reuse_hits_and_matches(backend, tiny_dir, tiny_ref):
    llm = make_llm(tiny_dir, backend, block_size=8, **{"kv_cache.max_tokens": 2048})
    shared = random_prompts([70], seed=2)[0]
    first = shared + [11, 12, 13]
    second = shared + [21, 22]
    out1 = llm.generate(first, SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)
    assert llm.kv_cache_stats.prefix_hit_tokens == 0
    out2 = llm.generate(second, SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)
    assert llm.kv_cache_stats.prefix_hit_tokens == 64  # the 8 full shared blocks of 8 tokens
    check_all(tiny_ref, [first, second], out1 + out2, 10)
    # an identical prompt reuses everything but its last token's block
    out3 = llm.generate(first, SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)
    assert out3[0].outputs[0].token_ids == out1[0].outputs[0].token_ids
    assert llm.kv_cache_stats.num_used_blocks == 0


def test_requests_sharing_a_prefix_in_one_batch_compute_it_once(backend, tiny_dir, tiny_ref):
    # Submitted together, the first request computes the shared blocks; the others wait one step
    # and reuse them (the attention then multiplies those common blocks once for the whole group).
    llm = make_llm(tiny_dir, backend, block_size=8, **{"kv_cache.max_tokens": 2048})
    shared = random_prompts([48], seed=4)[0]
    prompts = [shared + own for own in random_prompts([5, 9, 3, 12, 7], seed=5)]
    steps_before = llm.executor.num_steps
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
    check_all(tiny_ref, prompts, outs, 12)
    assert llm.kv_cache_stats.prefix_hit_tokens == 4 * 48  # every later request reused all 6 blocks
    assert llm.executor.counters.tokens_forwarded == sum(map(len, prompts)) - 4 * 48 + 5 * 11
    assert llm.executor.num_steps - steps_before == 1 + 12  # one step held back, then all together
    assert llm.kv_cache_stats.num_used_blocks == 0


def test_prefix_reuse_off_gives_no_hits(backend, tiny_dir):
    llm = make_llm(tiny_dir, backend, enable_prefix_caching=False, **{"kv_cache.max_tokens": 512})
    prompt = random_prompts([40], seed=3)[0]
    a = llm.generate(prompt, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    b = llm.generate(prompt, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert llm.kv_cache_stats.prefix_hit_tokens == 0
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_max_utilization_preempts_and_resumes_identically(backend, tiny_dir, tiny_ref):
    # 12 blocks of 8 tokens: four 20-token prompts generating 30 tokens each cannot all fit.
    llm = make_llm(tiny_dir, backend, scheduler="max_utilization", block_size=8, **{"kv_cache.max_tokens": 96})
    prompts = random_prompts([20, 20, 20, 20], seed=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    check_all(tiny_ref, prompts, outs, 30)
    assert llm.kv_cache_stats.num_used_blocks == 0


@pytest.mark.parametrize("capacity", ["guaranteed_no_evict", "static_batch"])
def test_other_capacity_policies_match(backend, tiny_dir, tiny_ref, capacity):
    llm = make_llm(tiny_dir, backend, scheduler=capacity, block_size=8, max_batch_size=3, **{"kv_cache.max_tokens": 160})
    prompts = random_prompts([9, 30, 12, 25, 4], seed=5)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, **GREEDY), use_tqdm=False)
    check_all(tiny_ref, prompts, outs, 16)
    assert all(o.metrics["num_preemptions"] == 0 for o in outs)


def test_tied_embeddings_and_llama3_rope_checkpoint(backend, tmp_path, tokenizer_dir):
    from tests.conftest import make_tiny_checkpoint

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    path = make_tiny_checkpoint(tmp_path / "l3", tokenizer_dir, seed=7, tie=True, rope_parameters=rope)
    ref = reference_model(path)
    llm = make_llm(path, backend, **{"kv_cache.max_tokens": 1024})
    prompts = random_prompts([100, 150], seed=6)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
    check_all(ref, prompts, outs, 12)


def test_smollm2_matches_transformers(backend, smol_dir):
    ref = reference_model(smol_dir)
    llm = LLM(dtype="float32", backend=backend, max_num_tokens=32, **{"kv_cache.max_tokens": 4096})
    tok = llm.tokenizer
    system = "You are a concise assistant. Answer in one short sentence, and never use lists or code."
    texts = [
        "The capital of France is",
        tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "What is the tallest mountain?"}], tokenize=False, add_generation_prompt=True),
        "def fibonacci(n):",
    ]
    outs = llm.generate(texts, SamplingParams(max_tokens=16, **GREEDY), use_tqdm=False)
    prompts = [tok.encode(t) for t in texts]
    check_all(ref, prompts, outs, 16)
    assert "Paris" in outs[0].outputs[0].text
    # prefix reuse on the real model: the same system prompt, another question
    follow = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "Who wrote Hamlet?"}], tokenize=False, add_generation_prompt=True)
    out = llm.generate(follow, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
    assert llm.kv_cache_stats.prefix_hit_tokens >= 16
    check_all(ref, [tok.encode(follow)], out, 12)
    assert llm.kv_cache_stats.num_used_blocks == 0
