"""Speculative decoding with a draft model, on tiny random Llamas: the model as its own draft
accepts every greedy draft; another draft (mostly rejected) leaves greedy output as it is, single
requests and mixed batches with chunked prefill and prefix reuse, and the sampled distribution as
it is; both KV pools come back full with no rejected token in either prefix index."""

from __future__ import annotations

from collections import Counter

import pytest

from framework import LLM, SamplingParams
from tests.conftest import make_tiny_checkpoint, random_prompts
from tests.integration.test_verify_steps import true_keys

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
OPTIONS = dict(dtype="float32", max_num_tokens=32, **{"kv_cache.max_tokens": 4096, "kv_cache.block_size": 8})
DRAFTING = {"speculative.num_tokens": 4, "speculative.max_batch_size": 8}
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124}  # alpha 0.001, by df


def workloads():
    shared = random_prompts([20], seed=9)[0]
    mixed = [shared + own for own in random_prompts([3, 9, 30, 2], seed=10)]  # a shared prefix, chunked prompts
    return {"single": random_prompts([7], seed=11), "mixed": mixed + random_prompts([5, 41], seed=12)}


def drafting(target, draft) -> LLM:
    return LLM(str(target), speculative="draft_model", **{"speculative.model.path": str(draft)}, **DRAFTING, **OPTIONS)


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory, tokenizer_dir):
    """Another random model of the same vocabulary: its drafts are mostly wrong."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-draft"), tokenizer_dir, seed=1, num_hidden_layers=1)


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return LLM(str(tiny_dir), **OPTIONS)


@pytest.fixture(scope="module")
def itself(tiny_dir):
    return drafting(tiny_dir, tiny_dir)


@pytest.fixture(scope="module")
def other(tiny_dir, other_draft):
    return drafting(tiny_dir, other_draft)


def tokens(llm, prompts, params=GREEDY):
    llm.reset_prefix_cache()
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def pools(llm):
    return llm.executor.kv_cache_manager, llm.executor.drafter.request_states.kv_cache


def assert_all_freed(llm):
    for kv in pools(llm):
        stats = kv.stats()
        assert stats.num_used_blocks == 0 and stats.num_free_blocks == stats.num_blocks
    assert len(llm.executor.drafter.request_states) == 0 and not llm.executor.active


@pytest.mark.parametrize("workload", ["single", "mixed"])
def test_the_model_as_its_own_draft_accepts_every_greedy_draft(plain, itself, workload):
    prompts = workloads()[workload]
    before = itself.speculation_stats
    assert tokens(itself, prompts) == tokens(plain, prompts)
    stats = itself.speculation_stats
    drafts, accepted = stats.draft_tokens - before.draft_tokens, stats.accepted_tokens - before.accepted_tokens
    assert drafts > 0 and accepted == drafts
    assert_all_freed(itself)


@pytest.mark.parametrize("workload", ["single", "mixed"])
def test_greedy_output_is_the_same_with_a_draft_that_is_mostly_wrong(plain, other, workload):
    prompts = workloads()[workload]
    before = other.speculation_stats
    expected = tokens(plain, prompts)
    assert tokens(other, prompts) == expected
    stats = other.speculation_stats
    drafts, accepted = stats.draft_tokens - before.draft_tokens, stats.accepted_tokens - before.accepted_tokens
    assert drafts > 0 and accepted < drafts / 2  # many rejections, each rolled back in both caches
    assert_all_freed(other)
    sequences = [p + e for p, e in zip(prompts, expected)]
    for kv in pools(other):
        cached = set(kv.pool.cached)
        assert cached and cached <= true_keys(kv, sequences)  # no block holding a rejected token is keyed


def test_logprobs_stops_min_tokens_and_n_keep_their_meaning(plain, other):
    prompt = random_prompts([6], seed=13)[0]
    (free_run,) = tokens(plain, [prompt])
    params = [
        SamplingParams(max_tokens=20, temperature=0.0, logprobs=2, stop_token_ids=[free_run[9]]),
        SamplingParams(max_tokens=20, temperature=0.0, min_tokens=12, stop_token_ids=[free_run[9]], ignore_eos=True),
        SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
    ]
    expected = plain.generate([prompt] * 3, params, use_tqdm=False)
    got = other.generate([prompt] * 3, params, use_tqdm=False)
    for e, g in zip(expected, got):
        e, g = e.outputs[0], g.outputs[0]
        assert (g.token_ids, g.finish_reason, g.stop_reason) == (e.token_ids, e.finish_reason, e.stop_reason)
    assert [sorted(lp) for lp in got[0].outputs[0].logprobs] == [sorted(lp) for lp in expected[0].outputs[0].logprobs]
    for e_lp, g_lp in zip(expected[0].outputs[0].logprobs, got[0].outputs[0].logprobs):
        for token in e_lp:
            assert abs(e_lp[token].logprob - g_lp[token].logprob) < 1e-4
    (two,) = other.generate([prompt], SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True), use_tqdm=False)
    assert [len(c.token_ids) for c in two.outputs] == [6, 6] and all(c.finish_reason == "length" for c in two.outputs)
    assert_all_freed(other)


@pytest.fixture(scope="module")
def near_draft(tiny_dir, tmp_path_factory):
    """The target's weights with noise: drafts often right, often not, so both the accepted and
    the resampled path of the rule decide tokens."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("near-draft")
    for file in tiny_dir.iterdir():
        shutil.copy(file, path / file.name)
    weights = load_file(str(tiny_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(5)
    save_file({name: w + 0.005 * torch.randn(w.shape, generator=generator) if w.dim() > 1 else w for name, w in weights.items()}, str(path / "model.safetensors"))
    return path


def test_sampled_tokens_follow_the_target_with_an_imperfect_draft(tiny_dir, near_draft):
    """Two-sample chi-square on the joint distribution of the second and third tokens (top-3
    each), which a verify step of two drafts decides, over 600 requests, 120 at a time."""
    wide = dict(OPTIONS, max_num_tokens=1024, max_batch_size=120, **{"kv_cache.max_tokens": 8192})
    plain = LLM(str(tiny_dir), **wide)
    speculative = LLM(str(tiny_dir), speculative="draft_model", **{"speculative.model.path": str(near_draft), "speculative.max_batch_size": 120}, **wide)
    prompt = workloads()["single"][0]
    params = SamplingParams(max_tokens=4, temperature=1.0, top_k=3, ignore_eos=True)
    counts = [Counter(tuple(t[1:3]) for t in tokens(llm, [prompt] * 600, params)) for llm in (plain, speculative)]
    stats = speculative.speculation_stats
    assert stats.draft_tokens >= 1000 and 0.1 * stats.draft_tokens < stats.accepted_tokens < 0.95 * stats.draft_tokens
    cells = set(counts[0]) | set(counts[1])
    statistic = sum((counts[0][c] - counts[1][c]) ** 2 / (counts[0][c] + counts[1][c]) for c in cells)
    assert statistic < CHI2_999[min(len(cells) - 1, 8)], (counts, statistic)
    assert_all_freed(speculative)


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_a_batch(other):
    prompts = workloads()["mixed"][:3]
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_k=50, seed=100 + i, ignore_eos=True) for i in range(3)]
    together = [o.outputs[0].token_ids for o in other.generate(prompts, params, use_tqdm=False)]
    alone = [other.generate([p], q, use_tqdm=False)[0].outputs[0].token_ids for p, q in zip(prompts, params)]
    assert together == alone


def test_an_abort_mid_verification_frees_both_caches(other):
    before = other.speculation_stats.draft_tokens
    stream = other.stream(workloads()["mixed"][3], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    for out in stream:
        if len(out.outputs[0].token_ids) > 10:
            break
    stream.close()
    assert other.speculation_stats.draft_tokens > before
    assert_all_freed(other)


def test_a_draft_of_another_vocabulary_is_refused(tiny_dir, tmp_path, tokenizer_dir):
    small_vocab = make_tiny_checkpoint(tmp_path / "draft", tokenizer_dir, vocab_size=512)
    with pytest.raises(ValueError, match="vocabulary of 512 tokens and the target 49152"):
        drafting(tiny_dir, small_vocab)


def test_draft_model_needs_a_path(tiny_dir):
    with pytest.raises(ValueError, match="speculative.model.path"):
        LLM(str(tiny_dir), speculative="draft_model", **OPTIONS)


def test_smollm2_as_its_own_draft_accepts_every_greedy_draft(smol_dir):
    from framework.bench.grounded import w5_prompt

    options = dict(dtype="float32", max_num_tokens=256, **{"kv_cache.max_tokens": 2048})
    plain = LLM(**options)
    batch = [w5_prompt(plain.tokenizer), plain.chat_prompt([{"role": "user", "content": "Name three rivers."}])]
    params = SamplingParams(max_tokens=32, temperature=0.0)
    expected = [o.outputs[0].token_ids for o in plain.generate(batch, params, use_tqdm=False)]
    del plain
    itself = LLM(speculative="draft_model", **{"speculative.model.path": str(smol_dir)}, **options)
    assert [o.outputs[0].token_ids for o in itself.generate(batch, params, use_tqdm=False)] == expected
    stats = itself.speculation_stats
    assert stats.draft_tokens > 0 and stats.accepted_tokens == stats.draft_tokens
    assert_all_freed(itself)
