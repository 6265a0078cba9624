"""A bounded fuzz of the Python API: a few hundred generated bad inputs, each of which must end in a
clean ValueError/TypeError (or, where the mutation happens to be valid, a normal result), with the
engine answering identically afterwards and no block left in use."""

from __future__ import annotations

import random

import pytest

from framework import LLM, SamplingParams

BASE = dict(max_tokens=3, temperature=0.0, ignore_eos=True)
REFERENCE_PROMPT = [5, 6, 7, 8]

# values that break something somewhere: wrong types, non-finite numbers, out-of-range sizes
HOSTILE = [
    None, True, False, -1, 0, 1, 2**31, 2**64, 2**70, -(2**70), 10**5000, 0.5, -0.5, float("nan"),
    float("inf"), float("-inf"), 1e308, "", "x", "NaN", b"ab", [], [1], [-1], [2**70], [99999999],
    ["stop"], [""], ["a" * 5000], {"a": 1}, (1, 2), [1.5], [None], [True],
]
FIELDS = [
    "n", "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "logprobs", "prompt_logprobs", "skip_special_tokens",
]
PROMPTS = [
    "", "hello", "a\ud800b", [], [5, -1], [5, 49152], [5, 2**70], [1.0, 2.0], [True], b"hi", {"a": 1},
    None, [[1, 2]], [5] * 2000, (5, 6), "x" * 3000,
]


# valid but unusual settings: the fuzz must also run requests that reach a batch
EDGES = [
    dict(top_k=1), dict(temperature=1e-5), dict(temperature=50.0, seed=2**64 - 1), dict(n=3, seed=-(2**63)),
    dict(stop=["a"] * 64), dict(logprobs=20, prompt_logprobs=20), dict(min_tokens=3, stop_token_ids=[2]),
    dict(repetition_penalty=1e30), dict(presence_penalty=-2.0, frequency_penalty=2.0), dict(top_p=1e-9),
    dict(min_p=1.0), dict(stop_token_ids=list(range(1024))), dict(skip_special_tokens=False),
]


def mutations(rng: random.Random, count: int):
    for _ in range(count):
        kwargs = dict(BASE)
        if rng.random() < 0.6:
            for field in rng.sample(FIELDS, rng.randint(1, 2)):
                kwargs[field] = rng.choice(HOSTILE)
        else:
            kwargs.update(rng.choice(EDGES))
        prompt = rng.choice(PROMPTS) if rng.random() < 0.3 else [rng.randrange(3, 49152) for _ in range(rng.randint(1, 6))]
        yield prompt, kwargs


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", max_model_len=512, **{"kv_cache.max_tokens": 2048})


def test_a_few_hundred_bad_inputs_end_in_clean_errors(llm):
    reference = llm.generate(REFERENCE_PROMPT, SamplingParams(**BASE), use_tqdm=False)[0].outputs[0].token_ids
    rng = random.Random(2026)
    tried = clean_errors = ran = 0
    for prompt, kwargs in mutations(rng, 300):
        tried += 1
        try:
            params = SamplingParams(**kwargs)
            outs = llm.generate(prompt, params, use_tqdm=False)
        except (ValueError, TypeError) as exc:
            assert str(exc), f"an empty message for {kwargs} / {prompt!r:.60}"
            clean_errors += 1
            continue
        ran += 1
        for out in outs:
            assert out.error is None, f"{kwargs} reached a batch and failed there: {out.error}"
            assert all(c.finish_reason in ("stop", "length") for c in out.outputs)
    print(f"fuzz: {tried} tried, {clean_errors} clean errors, {ran} ran")
    assert tried == 300 and clean_errors > 150 and ran > 50  # both paths were really exercised
    assert llm.kv_cache_stats.num_used_blocks == 0 and not llm.executor.active
    again = llm.generate(REFERENCE_PROMPT, SamplingParams(**BASE), use_tqdm=False)[0].outputs[0].token_ids
    assert again == reference
