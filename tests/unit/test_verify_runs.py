"""A verify step's runs (framework/executor/verify.py) decoded position by position and, where the
decoder says each row's token depends on that row alone, all rows at once: the same tokens,
logprobs and accepted drafts."""

from __future__ import annotations

import pytest
import torch

from framework.decoder.greedy import GreedyDecoder
from framework.decoder.sampling import SamplingDecoder
from framework.executor.verify import decode_runs
from framework.request import LlmRequest
from framework.sampling_params import SamplingParams


class PositionByPosition:
    """The decoder, made to say that its rows depend on the tokens before them."""

    def __init__(self, decoder):
        self.decoder = decoder

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def decodes_rows_alone(self, requests):
        return False


def batch(logits_per_request, drafts_per_request, **params):
    requests, rows = [], []
    for i, (logits, drafts) in enumerate(zip(logits_per_request, drafts_per_request)):
        request = LlmRequest(str(i), [1, 2, 3], SamplingParams(max_tokens=16, temperature=0.0, **params))
        request.output_token_ids = [4]
        request.draft_token_ids = list(drafts)
        requests.append(request)
        rows.append(logits)
    return requests, torch.cat(rows)


@pytest.mark.parametrize("decoder", [GreedyDecoder(None), SamplingDecoder(None)], ids=["greedy", "sampling"])
@pytest.mark.parametrize("logprobs", [None, 2])
def test_all_rows_at_once_give_the_runs_of_position_by_position(decoder, logprobs):
    torch.manual_seed(0)
    logits = [torch.randn(1 + k, 8) for k in (0, 3, 3, 5)]
    best = [row.argmax(-1).tolist() for row in logits]
    drafts = [[], best[1][:3], best[2][:1] + [(best[2][1] + 1) % 8, best[2][2]], best[3][:5]]  # none, all right, right then wrong, all right
    requests, rows = batch(logits, drafts, logprobs=logprobs)
    assert decoder.decodes_rows_alone(requests)
    at_once = decode_runs(decoder, requests, rows)
    one_by_one = decode_runs(PositionByPosition(decoder), requests, rows)
    assert [(tokens, lps) for _, tokens, lps in at_once] == [(tokens, lps) for _, tokens, lps in one_by_one]
    assert [len(tokens) for _, tokens, _ in at_once] == [1, 4, 2, 6]
    assert all(r.output_token_ids == [4] for r in requests)  # (runs are appended by the executor)


def test_penalties_sampling_and_a_pending_min_tokens_read_the_tokens_before():
    decoder = SamplingDecoder(None)
    assert not decoder.decodes_rows_alone(batch([torch.zeros(1, 8)], [[]], repetition_penalty=1.2)[0])
    assert not decoder.decodes_rows_alone(batch([torch.zeros(1, 8)], [[]], min_tokens=5)[0])
    sampled = LlmRequest("s", [1], SamplingParams(max_tokens=4, temperature=0.8))
    assert not decoder.decodes_rows_alone([sampled])
