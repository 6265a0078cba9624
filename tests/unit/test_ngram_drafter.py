"""Prompt lookup: which tokens the n-gram drafter proposes, and when it pauses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from framework.drafter.ngram import NgramConfig, NgramDrafter, lookup
from framework.request import LlmRequest
from framework.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "tokens, ngram_min, ngram_max, k, expected",
    [
        ([1, 2, 3, 9, 9, 1, 2, 3], 1, 4, 3, [9, 9, 1]),  # suffix [1, 2, 3] occurred at the start
        ([1, 2, 3, 9, 8, 1, 2, 3], 1, 4, 2, [9, 8]),  # at most k
        ([5, 1, 7, 3, 1, 6, 3, 1], 1, 4, 2, [6, 3]),  # the latest earlier occurrence of [3, 1]
        ([4, 2, 7, 8, 2, 5, 9, 4, 2], 1, 2, 3, [7, 8, 2]),  # the longest suffix ([4, 2]) beats [2]'s later hit
        ([1, 2, 3, 4], 1, 4, 3, []),  # nothing repeats
        ([1, 2, 1], 2, 3, 3, []),  # [1] would match, but suffixes shorter than ngram_min do not count
        ([7, 7, 7], 1, 4, 4, [7]),  # [7, 7] occurred at 0; one token followed it before the end
        ([3], 1, 4, 4, []),
    ],
)
def test_lookup(tokens, ngram_min, ngram_max, k, expected):
    assert lookup(tokens, ngram_min, ngram_max, k) == expected


def drafter(k=3, max_batch=4, **config):
    return NgramDrafter(SimpleNamespace(num_tokens=k, max_batch_size=max_batch), NgramConfig(**config))


def decoding(request_id, tokens):
    request = LlmRequest(request_id, tokens[:2], SamplingParams(max_tokens=100))
    request.output_token_ids = tokens[2:]
    return request


def test_proposes_for_decoding_requests_up_to_k():
    d = drafter(k=2)
    r = decoding("a", [1, 2, 3, 1, 2])
    d.propose([r])
    assert r.draft_token_ids == [3, 1]


def test_a_large_batch_gets_no_drafts():
    d = drafter(max_batch=2)
    requests = [decoding(str(i), [1, 2, 1]) for i in range(3)]
    d.propose(requests)
    assert all(r.draft_token_ids == [] for r in requests)


def test_a_request_whose_drafts_keep_failing_pauses_then_tries_again():
    d = drafter(k=2, min_acceptance=0.3, pause_steps=2)
    r = decoding("a", [1, 2, 3, 1, 2])
    d.observe(r, 2, 0)  # estimate 0.5
    d.observe(r, 2, 0)  # 0.25 < 0.3: paused for two steps
    for _ in range(2):
        r.draft_token_ids = []
        d.propose([r])
        assert r.draft_token_ids == []
    d.propose([r])
    assert r.draft_token_ids == [3, 1]


def test_its_state_goes_with_the_request():
    from framework.request import RequestState

    d = drafter()
    r = decoding("a", [1, 2, 1])
    d.propose([r])
    assert len(d.request_states) == 1
    r.state = RequestState.FINISHED
    d.request_states.free_resources(r)
    assert len(d.request_states) == 0
