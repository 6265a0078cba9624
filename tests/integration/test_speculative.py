"""Speculative decoding with the n-gram drafter: the same greedy tokens as without it (tiny random
model and SmolLM2, single requests and mixed batches with chunked prefill and prefix reuse), the
same seeded samples, the same distribution unseeded, and nothing left behind."""

from __future__ import annotations

from collections import Counter

import pytest

from framework import LLM, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def repetitive(seed: int, length: int) -> list[int]:
    """A prompt that repeats a short phrase: text with something to look up."""
    phrase = random_prompts([7], seed=seed)[0]
    return (phrase * (length // 7 + 1))[:length]


def prompts():
    shared = repetitive(1, 24)
    return [repetitive(2, 30), shared + [11, 12], shared + [13], random_prompts([45], seed=3)[0], repetitive(4, 60)]


@pytest.fixture(scope="module")
def pair(tiny_dir):
    options = dict(dtype="float32", max_num_tokens=32, **{"kv_cache.max_tokens": 4096, "kv_cache.block_size": 8})
    plain = LLM(str(tiny_dir), **options)
    drafting = {"speculative.num_tokens": 4, "speculative.max_batch_size": 8, "speculative.min_acceptance": 0.0}
    speculative = LLM(str(tiny_dir), speculative="ngram", **drafting, **options)
    return plain, speculative


@pytest.mark.parametrize("batch", ["single", "mixed"])
def test_greedy_output_is_the_same_with_ngram_drafts(pair, batch):
    plain, speculative = pair
    chosen = prompts()[:1] if batch == "single" else prompts()
    before = speculative.speculation_stats
    expected = [o.outputs[0].token_ids for o in plain.generate(chosen, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in speculative.generate(chosen, GREEDY, use_tqdm=False)]
    assert got == expected
    assert speculative.speculation_stats.draft_tokens > before.draft_tokens  # (a random model rarely repeats: most are rejected)
    assert speculative.kv_cache_stats.num_used_blocks == 0 and len(speculative.executor.drafter.request_states) == 0


def test_seeded_samples_are_the_same_and_unseeded_ones_alike(pair):
    plain, speculative = pair
    seeded = [SamplingParams(max_tokens=12, temperature=0.7, seed=i, ignore_eos=True) for i in range(6)]
    prompt = prompts()[0]
    assert [o.outputs[0].token_ids for o in speculative.generate([prompt] * 6, seeded, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in plain.generate([prompt] * 6, seeded, use_tqdm=False)
    ]
    # unseeded: the second token's distribution over 400 draws, top-3 support
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)
    histograms = []
    for llm in pair:
        outs = llm.generate([prompt] * 400, params, use_tqdm=False)
        histograms.append(Counter(o.outputs[0].token_ids[1] for o in outs))
    support = set(histograms[0]) | set(histograms[1])
    total_variation = sum(abs(histograms[0][t] - histograms[1][t]) for t in support) / 800
    assert total_variation < 0.12, (histograms, total_variation)


def test_an_abort_mid_verification_frees_everything(pair):
    _, speculative = pair
    stream = speculative.stream(prompts()[4], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    for out in stream:
        if len(out.outputs[0].token_ids) > 20:
            break
    stream.close()
    assert speculative.speculation_stats.draft_tokens > 0
    assert speculative.kv_cache_stats.num_used_blocks == 0 and not speculative.executor.active
    assert len(speculative.executor.drafter.request_states) == 0


def test_smollm2_greedy_is_the_same_with_ngram_drafts(smol_dir):
    from framework.bench.grounded import w5_prompt

    plain = LLM(dtype="float32", max_num_tokens=256, **{"kv_cache.max_tokens": 4096})
    batch = [w5_prompt(plain.tokenizer), plain.chat_prompt([{"role": "user", "content": "Say 'la la la' ten times."}])]
    params = SamplingParams(max_tokens=48, temperature=0.0)
    expected = [o.outputs[0].token_ids for o in plain.generate(batch, params, use_tqdm=False)]
    del plain
    speculative = LLM(dtype="float32", max_num_tokens=256, speculative="ngram", **{"kv_cache.max_tokens": 4096})
    got = [o.outputs[0].token_ids for o in speculative.generate(batch, params, use_tqdm=False)]
    assert got == expected
    stats = speculative.speculation_stats
    assert stats.mean_accepted_per_verify_step > 1.0  # it copies the function: most drafts hold
