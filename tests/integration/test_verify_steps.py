"""Steps that verify several tokens, proven with oracle drafters written here: one that proposes the
true greedy continuation (every draft accepted: the same output in fewer steps) and one that always
proposes a wrong token (every draft rejected: the same output, the pool back to full, and no block
holding a rejected token in the prefix index)."""

from __future__ import annotations

import pytest

from framework import LLM, SamplingParams
from framework.drafter.base import Drafter
from tests.conftest import TINY_VOCAB, random_prompts

PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


class Oracle(Drafter):
    """Proposes up to `k` tokens of the known greedy continuation, or each of them plus one."""

    def __init__(self, truth: dict[tuple, list[int]], k: int, wrong: bool = False):
        self.truth, self.k, self.wrong = truth, k, wrong
        self.proposed = 0

    def propose(self, requests):
        for request in requests:
            done = len(request.output_token_ids)
            future = self.truth[tuple(request.prompt_token_ids)][done : done + self.k]
            request.draft_token_ids = [(t + 1) % TINY_VOCAB if self.wrong else t for t in future]
            self.proposed += len(request.draft_token_ids)

    def observe(self, request, proposed, accepted):
        pass


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", max_num_tokens=48, **{"kv_cache.max_tokens": 2048, "kv_cache.block_size": 4})


def workloads():
    shared = random_prompts([20], seed=9)[0]
    mixed = [shared + own for own in random_prompts([3, 9, 30, 2], seed=10)]  # a shared prefix, chunked prompts
    return {"single": random_prompts([7], seed=11), "mixed": mixed + random_prompts([5, 41], seed=12)}


def run(llm, prompts, drafter=None):
    llm.reset_prefix_cache()
    llm.executor.drafter = drafter
    steps = llm.executor.num_steps
    try:
        outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    finally:
        llm.executor.drafter = None
    return [o.outputs[0].token_ids for o in outs], llm.executor.num_steps - steps


def true_keys(kv, sequences: list[list[int]]) -> set:
    """The prefix-index keys of every full block of these token sequences (the manager's chain)."""
    keys, bs = set(), kv.block_size
    for tokens in sequences:
        parent = None
        for index in range((len(tokens) - 1) // bs):
            parent = (hash(parent), tuple(tokens[index * bs : (index + 1) * bs]))
            keys.add(parent)
    return keys


@pytest.mark.parametrize("workload", ["single", "mixed"])
def test_drafts_that_are_all_right_give_the_same_output_in_fewer_steps(llm, workload):
    prompts = workloads()[workload]
    expected, plain_steps = run(llm, prompts)
    oracle = Oracle({tuple(p): e for p, e in zip(prompts, expected)}, k=4)
    got, steps = run(llm, prompts, oracle)
    assert got == expected
    assert oracle.proposed > 0 and steps < plain_steps
    assert llm.kv_cache_stats.num_used_blocks == 0


@pytest.mark.parametrize("workload", ["single", "mixed"])
def test_drafts_that_are_all_wrong_are_rolled_back(llm, workload):
    prompts = workloads()[workload]
    expected, plain_steps = run(llm, prompts)
    oracle = Oracle({tuple(p): e for p, e in zip(prompts, expected)}, k=3, wrong=True)
    got, steps = run(llm, prompts, oracle)
    assert got == expected and steps == plain_steps
    assert oracle.proposed > 0
    kv = llm.executor.kv_cache_manager
    stats = kv.stats()
    assert stats.num_used_blocks == 0 and stats.num_free_blocks == stats.num_blocks
    cached = set(kv.pool.cached)
    assert cached and cached <= true_keys(kv, [p + e for p, e in zip(prompts, expected)])


def test_drafts_respect_max_tokens_and_stop_tokens(llm):
    prompt = random_prompts([6], seed=13)[0]
    (expected,), _ = run(llm, [prompt])
    stop_at = expected[5]
    params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_at])
    reference = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    llm.executor.drafter = Oracle({tuple(prompt): expected}, k=6)
    try:
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        short = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    finally:
        llm.executor.drafter = None
    assert out.token_ids == reference.token_ids and out.finish_reason == "stop" and out.stop_reason == stop_at
    assert short.token_ids == expected[:3] and short.finish_reason == "length"
    assert llm.kv_cache_stats.num_used_blocks == 0


@pytest.mark.parametrize("wrong", [False, True])
def test_a_seeded_sampled_request_draws_the_same_tokens_with_drafts(llm, wrong):
    prompts = workloads()["mixed"][:3]
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_k=50, seed=100 + i, ignore_eos=True) for i in range(3)]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    oracle = Oracle({tuple(p): e for p, e in zip(prompts, expected)}, k=3, wrong=wrong)
    llm.executor.drafter = oracle
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.executor.drafter = None
    assert got == expected and oracle.proposed > 0
