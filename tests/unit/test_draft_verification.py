"""The sampling decoder's accept/resample rule for drafts drawn from a distribution q, on hand-made
logits over 8 tokens: the tokens follow p whatever q is (chi-square), drafts are accepted as often
as min(1, p/q) says, a rejected draft is never the token, greedy rows and point-mass drafts keep
their meaning, and a seeded request decides the same whatever its batch."""

from __future__ import annotations

import pytest
import torch

from framework.decoder.base import DraftRows
from framework.decoder.sampling import SamplingDecoder, filtered_probs
from framework.request import LlmRequest
from framework.sampling_params import SamplingParams
from tests.unit.test_sampling_decoder import CHI2_7DF_999, ROW, chi_square, decoder, rows, softmax

N = 20000
CHI2_999 = {3: 16.266, 7: CHI2_7DF_999}  # chi-square critical values at alpha = 0.001, by degrees of freedom
# Draft distributions: close to p, far from it, and with mass where top-k leaves p none.
Q_NEAR = softmax([1.8, 1.1, 0.4, 0.1, -0.5, -0.9, 1.2, 0.3]).float()
Q_FAR = softmax([-1.0, 0.0, 2.0, 1.0, 1.5, 0.5, -1.0, 0.0]).float()


def requests(n: int, **params) -> list[LlmRequest]:
    return [LlmRequest(str(i), [0], SamplingParams(max_tokens=8, **params)) for i in range(n)]


def draws(q: torch.Tensor, n: int, seed: int = 1) -> list[int]:
    return torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(seed)).tolist()


def verify(d: SamplingDecoder, batch, drafts, probs):
    return d.verify(batch, rows(ROW, len(batch)), DraftRows(drafts, probs)).token_ids


@pytest.mark.parametrize("q", [Q_NEAR, Q_FAR], ids=["near", "far"])
@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=4)], ids=["plain", "top_k"])
def test_tokens_follow_p_whatever_q(q, params):
    batch = requests(N, **params)
    p = filtered_probs([r.sampling_params for r in batch[:1]], rows(ROW, 1), torch.tensor([params["temperature"]]))[0].double()
    drafts = draws(q, N)
    tokens = verify(decoder(), batch, drafts, [q] * N)
    support = p > 0
    assert all(bool(support[t]) for t in tokens)
    kept = support.nonzero().flatten()
    counts = torch.tensor(tokens)
    remapped = [int((kept == t).nonzero()) for t in counts.tolist()]
    assert chi_square(remapped, p[kept] / p[kept].sum()) < CHI2_999[len(kept) - 1]
    accepted = sum(t == dr for t, dr in zip(tokens, drafts)) / N
    assert abs(accepted - float(torch.minimum(p, q.double()).sum())) < 0.02  # P(accept) = sum min(p, q) = 1 - TV(p, q)


def test_a_rejected_draft_is_never_the_token():
    """On rejection the token comes from max(p - q, 0): zero at d, since rejection needs q(d) > p(d)."""
    q = Q_FAR
    batch = requests(N, temperature=1.0)
    drafts = draws(q, N, seed=2)
    tokens = verify(decoder(seed=3), batch, drafts, [q] * N)
    p = softmax(ROW)
    for token in set(tokens):
        assert p[token] > 0
    over = {t for t in range(8) if q[t] > p[t]}  # tokens q over-proposes: accepted less often than proposed
    for t in over:
        proposed = sum(1 for dr in drafts if dr == t)
        accepted = sum(1 for tok, dr in zip(tokens, drafts) if dr == t and tok == t)
        assert abs(accepted / proposed - float(p[t] / q[t])) < 0.05


def test_point_mass_drafts_are_accepted_with_probability_p():
    """A draft without q (prompt lookup) is accepted with probability p(d); the others follow p without d."""
    batch = requests(N, temperature=1.0)
    d = 6
    tokens = verify(decoder(seed=4), batch, [d] * N, [None] * N)
    p = softmax(ROW)
    assert abs(tokens.count(d) / N - float(p[d])) < 0.015
    assert chi_square(tokens, p) < CHI2_7DF_999


def test_greedy_rows_take_the_argmax_whatever_q():
    batch = requests(4, temperature=0.0)
    tokens = verify(decoder(), batch, [0, 1, 2, None], [Q_FAR, Q_FAR, None, None])
    assert tokens == [0, 0, 0, 0]


def test_a_seeded_request_decides_the_same_in_any_batch():
    q = Q_NEAR
    alone = requests(1, temperature=0.9, seed=7)
    drafts = draws(q, 40, seed=5)
    d = decoder()
    first = [verify(d, alone, [dr], [q])[0] for dr in drafts]
    d = decoder(seed=9)  # another shared generator, and the request meets it in a batch
    alone = requests(1, temperature=0.9, seed=7)
    crowd = [LlmRequest(f"crowd{i}", [0], SamplingParams(max_tokens=8, temperature=1.0)) for i in range(2)]
    second = []
    for dr in drafts:
        batch = [crowd[0], alone[0], crowd[1]]
        second.append(verify(d, batch, [3, dr, None], [Q_FAR, q, None])[1])
    assert first == second and len(set(first)) > 1
