"""Qwen 2, Qwen 3, Gemma 2 and 3 and sliding-window Mistral against transformers, on tiny random
checkpoints built with transformers' own config classes (fixed seeds, float32): greedy output token
for token, prompt logprobs within 1e-4, single requests and mixed batches with chunked prefill and
prefix reuse, sliding windows shorter than the prompts."""

from __future__ import annotations

import pytest
import torch

from framework import LLM, SamplingParams
from tests.conftest import GREEDY, make_tiny_checkpoint, random_prompts, reference_greedy, reference_model

WINDOW = 16  # shorter than most prompts below, so the sliding-window layers really slide
ARCHITECTURES = {
    "qwen2": dict(family="qwen2"),
    "qwen3": dict(family="qwen3", head_dim=16),
    # (transformers' Gemma 3 leaves the attention soft cap unused; so must the engine)
    "gemma3": dict(
        family="gemma3", head_dim=16, num_hidden_layers=4, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=5.0, attn_logit_softcapping=2.0,
    ),
    "gemma2": dict(
        family="gemma2", head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
    ),
    "mistral_window": dict(family="mistral", sliding_window=WINDOW),
    "qwen2_window": dict(family="qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tmp_path_factory, tokenizer_dir):
    """(checkpoint folder, transformers' model of it) for each architecture."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer_dir, seed=3, random_vectors=True, **ARCHITECTURES[request.param])
    return path, reference_model(path, attn_implementation="eager")


def make_llm(path, backend="torch", **options):
    return LLM(str(path), dtype="float32", backend=backend, **{"kv_cache.max_tokens": 2048, **options})


def assert_greedy_equal(ref, prompts, outs, max_tokens):
    for prompt, out in zip(prompts, outs, strict=True):
        expected, _ = reference_greedy(ref, prompt, max_tokens)
        assert out.outputs[0].token_ids == expected


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_single_prompts_match_token_for_token(arch, backend):
    path, ref = arch
    llm = make_llm(path, backend)
    for prompt in random_prompts([1, 9, 40, 75], seed=1):
        outs = llm.generate(prompt, SamplingParams(max_tokens=16, **GREEDY), use_tqdm=False)
        assert_greedy_equal(ref, [prompt], outs, 16)
    assert llm.kv_cache_stats.num_used_blocks == 0


def test_mixed_batch_with_chunked_prefill_and_prefix_reuse_matches(arch):
    path, ref = arch
    llm = make_llm(path, max_num_tokens=24, block_size=8)
    shared = random_prompts([40], seed=2)[0]
    first = [shared + [7, 8, 9]]
    llm.generate(first, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    prompts = [shared + own for own in random_prompts([3, 11], seed=4)] + random_prompts([5, 60, 2, 33], seed=5)
    outs = llm.generate(prompts, SamplingParams(max_tokens=14, **GREEDY), use_tqdm=False)
    assert llm.kv_cache_stats.prefix_hit_tokens == 2 * 40  # the 5 shared blocks, for both later requests
    assert_greedy_equal(ref, prompts, outs, 14)
    assert llm.kv_cache_stats.num_used_blocks == 0


@torch.no_grad()
def test_prompt_logprobs_within_1e4_of_transformers(arch):
    path, ref = arch
    llm = make_llm(path, max_num_tokens=24)
    prompts = random_prompts([6, 50, 23, 70], seed=6)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=5, **GREEDY), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        expected = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), dim=-1)
        for position, row in enumerate(out.prompt_logprobs[1:], start=1):
            for token, logprob in row.items():
                assert abs(logprob.logprob - expected[position - 1, token].item()) < LOGPROB_ATOL, (position, token)


def test_tokens_beyond_every_window_do_not_matter(tmp_path, tokenizer_dir):
    # Two layers, each seeing the last 8 positions: the last token sees back 14 positions at most.
    window, layers = 8, 2
    path = make_tiny_checkpoint(tmp_path / "m", tokenizer_dir, seed=5, family="mistral", sliding_window=window, num_hidden_layers=layers)
    llm = make_llm(path, block_size=4)
    prompt = random_prompts([40], seed=7)[0]
    reach = layers * (window - 1)
    far = [prompt[0] + 1] + prompt[1:]  # changed outside the reach of the last position
    near = prompt[: -reach] + [prompt[-reach] + 1] + prompt[-reach + 1 :]  # changed just inside it
    params = SamplingParams(max_tokens=1, logprobs=5, **GREEDY)
    base, changed_far, changed_near = (llm.generate(p, params, use_tqdm=False)[0].outputs[0].logprobs[0] for p in (prompt, far, near))
    assert {t: round(l.logprob, 5) for t, l in base.items()} == {t: round(l.logprob, 5) for t, l in changed_far.items()}
    assert {t: round(l.logprob, 5) for t, l in base.items()} != {t: round(l.logprob, 5) for t, l in changed_near.items()}
    ref = reference_model(path, attn_implementation="eager")
    assert_greedy_equal(ref, [prompt, far, near], [llm.generate(p, SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)[0] for p in (prompt, far, near)], 8)


def test_auto_backend_runs_windowed_models_on_a_backend_that_has_the_window(arch):
    path, _ = arch
    llm = make_llm(path, backend="auto")
    engine = llm.executor.model_engine
    needs = type(engine.model).attention_variants(engine.hf_config)
    assert needs <= type(engine.backend).attention_variants
    if "window" in path.name or "gemma" in path.name:
        assert "sliding_window" in needs and engine.backend.name == "torch"
    if "gemma2" in path.name:
        assert "soft_cap" in needs


def test_the_sliding_window_cache_frees_blocks_and_keeps_the_tokens(tmp_path, tokenizer_dir):
    """`kv_cache=sliding_window` on a Mistral whose every layer slides: blocks out of the window go
    back to the pool mid-request, and greedy output still equals transformers' on a mixed batch
    with chunked prefill and prefix reuse."""
    path = make_tiny_checkpoint(tmp_path / "m", tokenizer_dir, seed=3, random_vectors=True, family="mistral", sliding_window=WINDOW)
    llm = make_llm(path, max_num_tokens=24, block_size=8, kv_cache="sliding_window")
    kv = llm.executor.kv_cache_manager
    assert kv.window == WINDOW
    freed, update = [], kv.update_resources
    kv.update_resources = lambda scheduled: (update(scheduled), freed.append(sum(kv.dead.values())))
    shared = random_prompts([40], seed=2)[0]
    llm.generate([shared + [7, 8, 9]], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    prompts = [shared + own for own in random_prompts([3, 11], seed=4)] + random_prompts([5, 60, 2, 33], seed=5)
    outs = llm.generate(prompts, SamplingParams(max_tokens=14, **GREEDY), use_tqdm=False)
    assert llm.kv_cache_stats.prefix_hit_tokens > 0 and max(freed) >= 6
    assert_greedy_equal(reference_model(path, attn_implementation="eager"), prompts, outs, 14)
    assert llm.kv_cache_stats.num_used_blocks == 0 and not kv.dead
    simulated = LLM(str(path), engine="sim", kv_cache="sliding_window")  # the sim engine reads the window from config.json too
    assert simulated.executor.kv_cache_manager.window == WINDOW
