"""SamplingDecoder (and GreedyDecoder) on hand-made float32 logits, CPU only: the drawn
distribution, top-k / top-p / min-p supports, greedy rows, penalties, min_tokens, seeded and shared
generators, and logprobs of the raw distribution."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from framework.decoder.greedy import GreedyDecoder
from framework.decoder.sampling import SamplingDecoder
from framework.request import LlmRequest
from framework.sampling_params import SamplingParams

# A fixed row over 8 tokens, no ties.
ROW = [2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]
# Chi-square critical value for 7 degrees of freedom at alpha = 0.001.
CHI2_7DF_999 = 24.322


def decoder(seed: int = 0) -> SamplingDecoder:
    return SamplingDecoder(SimpleNamespace(name="sampling"), None, seed=seed)


def request(rid="r", prompt=(0,), params=None, outputs=(), eos=(), **kwargs) -> LlmRequest:
    params = params if params is not None else SamplingParams(max_tokens=64, **kwargs)
    r = LlmRequest(str(rid), list(prompt), params, eos_token_ids=tuple(eos))
    r.output_token_ids = list(outputs)
    return r


def batch(params: SamplingParams, n: int, **kwargs) -> list[LlmRequest]:
    return [request(i, params=params, **kwargs) for i in range(n)]


def rows(row, n) -> torch.Tensor:
    return torch.tensor([row], dtype=torch.float32).repeat(n, 1)


def frequencies(tokens, vocab) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def softmax(row, temperature=1.0) -> torch.Tensor:
    return torch.softmax(torch.tensor(row, dtype=torch.float64) / temperature, dim=0)


def total_variation(p, q) -> float:
    return 0.5 * float((p - q).abs().sum())


def chi_square(tokens, expected_probs) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(expected_probs)).double()
    expected = expected_probs * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def top_p_support(probs: torch.Tensor, top_p: float) -> set[int]:
    """The smallest prefix (by decreasing probability) whose mass reaches top_p."""
    order = sorted(range(len(probs)), key=lambda t: -float(probs[t]))
    kept, mass = set(), 0.0
    for t in order:
        kept.add(t)
        mass += float(probs[t])
        if mass >= top_p:
            break
    return kept


def renormalised(probs: torch.Tensor, support: set[int]) -> torch.Tensor:
    out = torch.zeros_like(probs)
    for t in support:
        out[t] = probs[t]
    return out / out.sum()


# ---- the drawn distribution --------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    n = 20000
    params = SamplingParams(temperature=temperature)
    tokens = decoder(seed=1).decode(batch(params, n), rows(ROW, n)).token_ids
    assert len(tokens) == n
    expected = softmax(ROW, temperature)
    empirical = frequencies(tokens, len(ROW))
    assert total_variation(empirical, expected) < 0.02
    assert chi_square(tokens, expected) < CHI2_7DF_999
    # the test can tell temperatures apart: T=1 is far from the drawn distribution
    assert total_variation(empirical, softmax(ROW, 1.0)) > 0.08


def test_each_row_uses_its_own_temperature():
    n = 20000
    reqs = [request(i, temperature=0.5 if i % 2 else 2.0) for i in range(n)]
    tokens = decoder(seed=2).decode(reqs, rows(ROW, n)).token_ids
    cold, hot = tokens[1::2], tokens[0::2]
    assert total_variation(frequencies(cold, 8), softmax(ROW, 0.5)) < 0.02
    assert total_variation(frequencies(hot, 8), softmax(ROW, 2.0)) < 0.02
    assert chi_square(cold, softmax(ROW, 0.5)) < CHI2_7DF_999
    assert chi_square(hot, softmax(ROW, 2.0)) < CHI2_7DF_999


def test_each_row_uses_its_own_logits():
    n = 4000
    a = [5.0, 0.0, 0.0, 0.0]
    b = [0.0, 0.0, 0.0, 5.0]
    logits = torch.tensor([a, b] * (n // 2), dtype=torch.float32)
    tokens = decoder().decode(batch(SamplingParams(), n), logits).token_ids
    assert sum(t == 0 for t in tokens[0::2]) > 0.9 * n / 2
    assert sum(t == 3 for t in tokens[1::2]) > 0.9 * n / 2


def test_never_draws_a_minus_inf_token():
    n = 5000
    row = [0.0, float("-inf"), 0.0, float("-inf"), 0.0]
    tokens = decoder().decode(batch(SamplingParams(temperature=3.0), n), rows(row, n)).token_ids
    assert set(tokens) == {0, 2, 4}


# ---- top-k, top-p, min-p -----------------------------------------------------------------------

WIDE = [1.2, -0.3, 0.8, 2.1, -1.5, 0.1, 1.7, -0.8, 0.45, -2.2]  # 10 tokens, distinct, no ties


@pytest.mark.parametrize("top_k", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("temperature", [0.8, 2.0])
def test_top_k_support_and_distribution(top_k, temperature):
    n = 5000
    params = SamplingParams(temperature=temperature, top_k=top_k)
    tokens = decoder(seed=3).decode(batch(params, n), rows(WIDE, n)).token_ids
    allowed = set(sorted(range(len(WIDE)), key=lambda t: -WIDE[t])[:top_k])
    assert set(tokens) == allowed
    expected = renormalised(softmax(WIDE, temperature), allowed)
    assert total_variation(frequencies(tokens, len(WIDE)), expected) < 0.03


def test_top_k_larger_than_vocab_keeps_everything():
    n = 5000
    tokens = decoder().decode(batch(SamplingParams(temperature=2.0, top_k=50), n), rows(WIDE, n)).token_ids
    assert set(tokens) == set(range(len(WIDE)))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.7, 0.85, 0.95])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_p_keeps_smallest_prefix_reaching_top_p(top_p, temperature):
    n = 6000
    probs = softmax(WIDE, temperature)
    sorted_probs = probs.sort(descending=True).values
    # keep clear of the boundary so float rounding cannot decide the support
    assert all(abs(float(c) - top_p) > 1e-3 for c in sorted_probs.cumsum(0))
    allowed = top_p_support(probs, top_p)
    params = SamplingParams(temperature=temperature, top_p=top_p)
    tokens = decoder(seed=4).decode(batch(params, n), rows(WIDE, n)).token_ids
    assert set(tokens) == allowed
    assert total_variation(frequencies(tokens, len(WIDE)), renormalised(probs, allowed)) < 0.03


def test_top_p_support_grows_by_one_token_past_each_cumulative_boundary():
    probs = softmax(WIDE, 1.0)
    cum = probs.sort(descending=True).values.cumsum(0).tolist()
    d = decoder(seed=5)
    n = 3000
    for size in (1, 2, 3, 4):
        just_below = cum[size - 1] - 0.01  # mass of the top `size` tokens reaches it: keep exactly `size`
        just_above = cum[size - 1] + 0.01  # needs one more token
        below = d.decode(batch(SamplingParams(top_p=just_below), n), rows(WIDE, n)).token_ids
        above = d.decode(batch(SamplingParams(top_p=min(just_above, 1.0)), n), rows(WIDE, n)).token_ids
        assert len(set(below)) == size
        assert len(set(above)) == size + 1


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # top-3 of WIDE is {3, 6, 0}; renormalised, token 3 alone has ~0.46 of the mass, 3+6 ~0.8
    n = 5000
    probs = renormalised(softmax(WIDE), {3, 6, 0})
    allowed = top_p_support(probs, 0.7)
    assert allowed == {3, 6}
    # without renormalisation, the top-2 mass over the full vocabulary would be < 0.7
    assert float(softmax(WIDE)[[3, 6]].sum()) < 0.7
    params = SamplingParams(top_k=3, top_p=0.7)
    tokens = decoder(seed=6).decode(batch(params, n), rows(WIDE, n)).token_ids
    assert set(tokens) == allowed


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_min_p_keeps_tokens_above_fraction_of_the_top_probability(min_p, temperature):
    n = 5000
    probs = softmax(WIDE, temperature)
    threshold = min_p * float(probs.max())
    assert all(abs(float(p) - threshold) > 1e-4 for p in probs)
    allowed = {t for t in range(len(WIDE)) if float(probs[t]) >= threshold}
    params = SamplingParams(temperature=temperature, min_p=min_p)
    tokens = decoder(seed=7).decode(batch(params, n), rows(WIDE, n)).token_ids
    assert set(tokens) == allowed
    assert total_variation(frequencies(tokens, len(WIDE)), renormalised(probs, allowed)) < 0.03


def test_filters_are_per_row_in_a_mixed_batch():
    n = 3000
    params = [
        SamplingParams(top_k=2, temperature=2.0),
        SamplingParams(top_p=0.3),
        SamplingParams(min_p=0.5, temperature=1.5),
        SamplingParams(temperature=2.0),
    ]
    reqs = [request(i, params=params[i % 4]) for i in range(4 * n)]
    tokens = decoder(seed=8).decode(reqs, rows(WIDE, 4 * n)).token_ids
    top2 = set(sorted(range(10), key=lambda t: -WIDE[t])[:2])
    p15 = softmax(WIDE, 1.5)
    assert set(tokens[0::4]) == top2
    assert set(tokens[1::4]) == top_p_support(softmax(WIDE), 0.3)
    assert set(tokens[2::4]) == {t for t in range(10) if p15[t] >= 0.5 * p15.max()}
    assert set(tokens[3::4]) == set(range(10))


# ---- greedy ------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_even_with_filters_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 100, generator=g)
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.2, min_p=0.9)
    out = decoder().decode(batch(params, 64), logits)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_greedy_rows_unaffected_in_a_mixed_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 50, generator=g) * 3
    greedy = SamplingParams(temperature=0.0)
    hot = SamplingParams(temperature=5.0, top_p=0.9)
    reqs = [request(i, params=greedy if i % 3 == 0 else hot) for i in range(200)]
    tokens = decoder().decode(reqs, logits.clone()).token_ids
    argmax = logits.argmax(-1).tolist()
    assert all(tokens[i] == argmax[i] for i in range(0, 200, 3))
    # the sampled rows really sample (at temperature 5 most differ from the argmax)
    assert sum(tokens[i] != argmax[i] for i in range(200) if i % 3) > 50


def test_decode_does_not_modify_the_callers_logits():
    logits = torch.tensor([ROW, ROW], dtype=torch.float32)
    before = logits.clone()
    reqs = [
        request("a", prompt=[0, 6], repetition_penalty=2.0, presence_penalty=1.0, temperature=0.5, top_k=3),
        request("b", prompt=[0], min_tokens=2, eos=(0,), min_p=0.3),
    ]
    decoder().decode(reqs, logits)
    assert torch.equal(logits, before)


def test_empty_batch():
    assert decoder().decode([], torch.empty(0, 8)).token_ids == []
    assert GreedyDecoder(SimpleNamespace(name="greedy")).decode([], torch.empty(0, 8)).token_ids == []


def test_greedy_decoder_returns_argmax_whatever_the_params():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 300, generator=g)
    params = SamplingParams(temperature=1.5, top_k=5, repetition_penalty=2.0, min_tokens=3, max_tokens=4)
    reqs = [request(i, prompt=[int(logits[i].argmax())], params=params, eos=(int(logits[i].argmax()),)) for i in range(16)]
    out = GreedyDecoder(SimpleNamespace(name="greedy")).decode(reqs, logits)
    assert out.token_ids == logits.argmax(-1).tolist()



def test_decoders_take_the_argmax_of_the_backend_they_are_given():
    shapes = []
    backend = SimpleNamespace(argmax=lambda x: shapes.append(tuple(x.shape)) or x.argmax(dim=-1))
    logits = torch.randint(0, 3, (16, 300), generator=torch.Generator().manual_seed(3)).float()  # ties
    reqs = batch(SamplingParams(temperature=0.0, max_tokens=4), 16)
    sampling = SamplingDecoder(SimpleNamespace(name="sampling"), None, seed=0, backend=backend)
    assert sampling.decode(reqs, logits).token_ids == logits.argmax(-1).tolist()
    greedy = GreedyDecoder(SimpleNamespace(name="greedy"), backend=backend)
    assert greedy.decode(reqs, logits).token_ids == logits.argmax(-1).tolist()
    assert shapes == [(16, 300), (16, 300)]
    assert decoder().decode(reqs, logits).token_ids == logits.argmax(-1).tolist()  # no backend: PyTorch's
    assert shapes == [(16, 300), (16, 300)]


# ---- penalties ---------------------------------------------------------------------------------

PEN_ROW = [1.0, 2.0, -1.0, 3.0, -2.0, 0.5, 1.5, -0.5]
PROMPT = [1, 3]  # token 1: prompt only; token 3: prompt and output
OUTPUT = [3, 4, 4, 6]  # counts: 3 -> 1, 4 -> 2, 6 -> 1


def penalised(**kwargs) -> list[float]:
    logits = torch.tensor([PEN_ROW], dtype=torch.float32)
    decoder()._apply_penalties([request(prompt=PROMPT, outputs=OUTPUT, **kwargs)], logits)
    return logits[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    expected = list(PEN_ROW)
    expected[1] = 2.0 / 2  # prompt only
    expected[3] = 3.0 / 2  # prompt and output
    expected[4] = -2.0 * 2  # output, negative
    expected[6] = 1.5 / 2  # output only
    assert penalised(repetition_penalty=2.0) == pytest.approx(expected, abs=1e-6)


def test_repetition_penalty_below_one_boosts_seen_tokens():
    expected = list(PEN_ROW)
    expected[1], expected[3], expected[4], expected[6] = 2.0 / 0.5, 3.0 / 0.5, -2.0 * 0.5, 1.5 / 0.5
    assert penalised(repetition_penalty=0.5) == pytest.approx(expected, abs=1e-6)


def test_presence_penalty_subtracted_once_for_output_tokens_only():
    expected = list(PEN_ROW)
    for t in (3, 4, 6):  # not token 1 (prompt only); token 4 (twice) only once
        expected[t] -= 0.75
    assert penalised(presence_penalty=0.75) == pytest.approx(expected, abs=1e-6)


def test_frequency_penalty_subtracted_per_occurrence_in_output():
    expected = list(PEN_ROW)
    expected[3] -= 0.5 * 1
    expected[4] -= 0.5 * 2
    expected[6] -= 0.5 * 1
    assert penalised(frequency_penalty=0.5) == pytest.approx(expected, abs=1e-6)


def test_negative_presence_and_frequency_penalties_encourage():
    expected = list(PEN_ROW)
    for t, count in ((3, 1), (4, 2), (6, 1)):
        expected[t] += 1.0 + 0.25 * count
    assert penalised(presence_penalty=-1.0, frequency_penalty=-0.25) == pytest.approx(expected, abs=1e-6)


def test_all_penalties_combined_repetition_first():
    rep, pres, freq = 1.5, 0.3, 0.2
    expected = list(PEN_ROW)
    counts = {3: 1, 4: 2, 6: 1}
    for t in set(PROMPT) | set(OUTPUT):
        expected[t] = expected[t] / rep if expected[t] > 0 else expected[t] * rep
    for t, c in counts.items():
        expected[t] -= pres + freq * c
    got = penalised(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
    assert got == pytest.approx(expected, abs=1e-6)


def test_penalties_only_touch_their_own_rows():
    logits = torch.tensor([PEN_ROW] * 3, dtype=torch.float32)
    reqs = [
        request("plain", prompt=PROMPT, outputs=OUTPUT),  # no penalties
        request("rep", prompt=[5], outputs=[0], repetition_penalty=4.0),
        request("freq", prompt=[5], outputs=[7, 7, 7], frequency_penalty=1.0),
    ]
    decoder()._apply_penalties(reqs, logits)
    assert logits[0].tolist() == pytest.approx(PEN_ROW)
    rep = list(PEN_ROW)
    rep[5], rep[0] = 0.5 / 4, 1.0 / 4
    assert logits[1].tolist() == pytest.approx(rep, abs=1e-6)
    freq = list(PEN_ROW)
    freq[7] = -0.5 - 3.0
    assert logits[2].tolist() == pytest.approx(freq, abs=1e-6)


def test_repetition_penalty_flips_argmax_through_decode():
    row = [3.0, 2.5, 0.0, -1.0]
    logits = torch.tensor([row, row], dtype=torch.float32)
    reqs = [
        request("a", prompt=[0], temperature=0.0, repetition_penalty=1.5),  # 3 / 1.5 = 2 < 2.5
        request("b", prompt=[0], temperature=0.0, repetition_penalty=1.1),  # 3 / 1.1 > 2.5
    ]
    assert decoder().decode(reqs, logits).token_ids == [1, 0]


def test_presence_penalty_flips_argmax_only_for_output_tokens():
    row = [3.0, 2.5, 0.0, -1.0]
    logits = torch.tensor([row, row], dtype=torch.float32)
    reqs = [
        request("out", prompt=[2], outputs=[0], temperature=0.0, presence_penalty=1.0),
        request("prompt", prompt=[0], temperature=0.0, presence_penalty=2.0),  # prompt does not count
    ]
    assert decoder().decode(reqs, logits).token_ids == [1, 0]


def test_frequency_penalty_accumulates_over_decode_steps():
    # token 0 leads by 3: with frequency 2.0 it survives one occurrence (lead 1), not two (lead -1)
    row = [3.0, 0.0, -1.0, -2.0]
    r = request(prompt=[3], temperature=0.0, frequency_penalty=2.0)
    d = decoder()
    produced = []
    for _ in range(4):
        token = d.decode([r], torch.tensor([row], dtype=torch.float32)).token_ids[0]
        r.output_token_ids.append(token)  # as the executor does
        produced.append(token)
    # after [0, 0]: logit0 = 3 - 4 = -1 < 0 (token 1); after [0, 0, 1]: logit1 = -2 < -1 = logit0
    assert produced == [0, 0, 1, 0]


def test_penalty_statistics_pick_up_outputs_present_before_the_first_decode():
    row = [3.0, 0.0, -1.0, -2.0]
    r = request(prompt=[3], outputs=[0, 0], temperature=0.0, frequency_penalty=2.0)
    assert decoder().decode([r], torch.tensor([row], dtype=torch.float32)).token_ids == [1]


# ---- min_tokens --------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_token_ids_while_too_few_outputs():
    row = [0.0, 1.0, 9.0, 0.5, 0.2, 8.0]  # EOS (2) is the argmax, stop token 5 second
    params = SamplingParams(min_tokens=3, max_tokens=8, stop_token_ids=[5], temperature=1.0)
    n = 3000
    # output lengths 0, 1, 2 (too few) and 3 (enough), interleaved
    reqs = [request(i, prompt=[1], eos=(2,), params=params, outputs=[0] * (i % 4)) for i in range(n)]
    tokens = decoder().decode(reqs, rows(row, n)).token_ids
    short = [t for i, t in enumerate(tokens) if i % 4 < 3]
    enough = [t for i, t in enumerate(tokens) if i % 4 == 3]
    assert 2 not in short and 5 not in short
    assert set(short) == {0, 1, 3, 4}
    assert enough.count(2) > 0.5 * len(enough) and 5 in enough


def test_min_tokens_over_decode_steps():
    row = [0.0, 1.0, 9.0, 0.5, 0.2, 8.0]
    r = request(prompt=[1], eos=(2,), min_tokens=3, stop_token_ids=[5], temperature=0.0)
    d = decoder()
    produced = []
    for _ in range(4):
        token = d.decode([r], rows(row, 1)).token_ids[0]
        r.output_token_ids.append(token)
        produced.append(token)
    assert produced == [1, 1, 1, 2]


def test_min_tokens_greedy_picks_the_best_allowed_token():
    row = [0.0, 1.0, 9.0, 0.5, 0.2, 8.0]
    reqs = [
        request("a", eos=(2,), min_tokens=1, temperature=0.0),  # EOS masked: 5
        request("b", eos=(2,), min_tokens=1, stop_token_ids=[5], temperature=0.0),  # both masked: 1
        request("c", eos=(2,), min_tokens=1, outputs=[0], temperature=0.0),  # satisfied: EOS
        request("d", eos=(2,), min_tokens=0, temperature=0.0),
    ]
    assert decoder().decode(reqs, rows(row, 4)).token_ids == [5, 1, 2, 2]


def test_min_tokens_with_ignore_eos_leaves_eos_allowed_but_still_masks_stop_token_ids():
    row = [0.0, 1.0, 9.0, 0.5, 0.2, 8.0]
    reqs = [
        request("a", eos=(2,), min_tokens=2, ignore_eos=True, temperature=0.0),
        request("b", eos=(2,), min_tokens=2, ignore_eos=True, stop_token_ids=[2], temperature=0.0),
    ]
    assert decoder().decode(reqs, rows(row, 2)).token_ids == [2, 5]


def test_min_tokens_masks_every_eos_id():
    row = [9.0, 8.5, 8.0, 0.0]
    reqs = [request(eos=(0, 1), min_tokens=1, temperature=0.0)]
    assert decoder().decode(reqs, rows(row, 1)).token_ids == [2]


# ---- generators --------------------------------------------------------------------------------

STEPS = 20
VOCAB = 50


def step_logits(num_steps=STEPS, vocab=VOCAB, seed=123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_steps, vocab, generator=g) * 0.5  # flat-ish: draws vary a lot


def run_alone(seed, d, params_kwargs=None):
    logits = step_logits()
    r = request("seeded", seed=seed, **(params_kwargs or {}))
    out = []
    for s in range(STEPS):
        token = d.decode([r], logits[s : s + 1]).token_ids[0]
        r.output_token_ids.append(token)
        out.append(token)
    return out


def run_in_crowd(seed, d, order_seed, params_kwargs=None):
    logits = step_logits()
    rng = random.Random(order_seed)
    r = request("seeded", seed=seed, **(params_kwargs or {}))
    others = [
        request("unseeded", temperature=1.0),
        request("greedy", temperature=0.0),
        request("other-seed", seed=seed + 1),
        request("hot", temperature=3.0, top_k=10),
    ]
    g = torch.Generator().manual_seed(order_seed)
    out = []
    for s in range(STEPS):
        members = [m for m in others if rng.random() < 0.7] + [r]
        rng.shuffle(members)
        batch_logits = torch.randn(len(members), VOCAB, generator=g)
        batch_logits[members.index(r)] = logits[s]
        tokens = d.decode(members, batch_logits).token_ids
        for m, t in zip(members, tokens):
            m.output_token_ids.append(t)
        out.append(tokens[members.index(r)])
    return out


def test_seeded_request_draws_do_not_depend_on_the_batch():
    alone = run_alone(1234, decoder(seed=0))
    assert len(set(alone)) > 5  # really sampling
    for order_seed in (1, 2, 3):
        assert run_in_crowd(1234, decoder(seed=order_seed + 10), order_seed) == alone


def test_seeded_request_with_filters_and_penalties_is_batch_independent():
    kwargs = {"temperature": 1.3, "top_p": 0.9, "presence_penalty": 0.5}
    alone = run_alone(99, decoder(seed=5), kwargs)
    assert run_in_crowd(99, decoder(seed=6), order_seed=4, params_kwargs=kwargs) == alone


def test_same_seed_same_draws_different_seeds_differ():
    a = run_alone(7, decoder(seed=0))
    b = run_alone(7, decoder(seed=1))
    c = run_alone(8, decoder(seed=0))
    assert a == b
    assert a != c


def test_seeded_generator_is_the_decoders_until_the_request_finishes():
    from framework.request import RequestState

    d = decoder()
    r = request(seed=42)
    assert d.request_states.peek(r) is None
    d.decode([r], rows(ROW, 1))
    generator = d.request_states.peek(r).generator
    assert isinstance(generator, torch.Generator)
    d.request_states.free_resources(r)  # preempted, not finished: it draws on from the same generator
    assert d.request_states.peek(r).generator is generator
    r.state = RequestState.FINISHED
    d.request_states.free_resources(r)
    assert d.request_states.peek(r) is None and len(d.request_states) == 0
    unseeded = request()
    d.decode([unseeded], rows(ROW, 1))
    assert d.request_states.peek(unseeded) is None


@pytest.mark.parametrize("seed", [0, -5, -(2**63), 2**64 - 1])
def test_any_valid_seed_works(seed):
    a = run_alone(seed, decoder())
    assert a == run_alone(seed, decoder(seed=3))


def test_unseeded_requests_use_the_decoders_shared_generator():
    n = 200
    logits = step_logits(n, VOCAB)
    params = SamplingParams(temperature=1.0)
    first = decoder(seed=11).decode(batch(params, n), logits).token_ids
    same = decoder(seed=11).decode(batch(params, n), logits).token_ids
    other = decoder(seed=12).decode(batch(params, n), logits).token_ids
    assert first == same
    assert first != other
    d = decoder(seed=11)
    d.decode(batch(params, n), logits)
    assert d.decode(batch(params, n), logits).token_ids != first  # the generator advances


# ---- logprobs ----------------------------------------------------------------------------------


def raw_logprobs(row) -> list[float]:
    return torch.log_softmax(torch.tensor(row, dtype=torch.float64), dim=0).tolist()


def expected_rank(lps, token) -> int:
    return 1 + sum(1 for v in lps if v > lps[token])


def test_logprobs_are_of_the_raw_distribution_with_top_k_and_chosen():
    g = torch.Generator().manual_seed(9)
    row = (torch.randn(30, generator=g) * 2).tolist()
    lps = raw_logprobs(row)
    order = sorted(range(30), key=lambda t: -lps[t])
    # penalties push the five best tokens down: the greedy choice is the 6th by raw logprob
    r = request(prompt=order[:5], temperature=0.0, repetition_penalty=100.0, logprobs=3)
    out = decoder().decode([r], torch.tensor([row], dtype=torch.float32))
    chosen = out.token_ids[0]
    assert chosen == order[5]
    got = out.logprobs[0]
    assert set(got) == set(order[:3]) | {chosen}
    for token, (value, rank) in got.items():
        assert value == pytest.approx(lps[token], abs=1e-5)
        assert rank == expected_rank(lps, token)
    assert [got[t][1] for t in order[:3]] == [1, 2, 3]
    assert got[chosen][1] == 6


def test_logprobs_unaffected_by_temperature_and_filters():
    g = torch.Generator().manual_seed(10)
    row = torch.randn(40, generator=g).tolist()
    lps = raw_logprobs(row)
    n = 50
    params = SamplingParams(temperature=0.3, top_k=4, min_p=0.2, logprobs=5)
    out = decoder().decode(batch(params, n), rows(row, n))
    top5 = set(sorted(range(40), key=lambda t: -lps[t])[:5])
    for token, got in zip(out.token_ids, out.logprobs):
        assert set(got) == top5 | {token}
        for t, (value, rank) in got.items():
            assert value == pytest.approx(lps[t], abs=1e-5)
            assert rank == expected_rank(lps, t)


def test_logprobs_per_request_k_and_none():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 25, generator=g)
    reqs = [
        request("k1", temperature=0.0, logprobs=1),
        request("none", temperature=0.0),
        request("k0", temperature=1.0, logprobs=0),
        request("k6", temperature=0.0, logprobs=6),
    ]
    out = decoder().decode(reqs, logits)
    assert out.logprobs[1] is None
    argmax = logits.argmax(-1).tolist()
    # greedy rows: the argmax is rank 1, so top-k already holds it
    assert set(out.logprobs[0]) == {argmax[0]}
    assert out.logprobs[0][argmax[0]][1] == 1
    assert set(out.logprobs[2]) == {out.token_ids[2]}  # k = 0: just the chosen token
    lps3 = raw_logprobs(logits[3].tolist())
    assert set(out.logprobs[3]) == set(sorted(range(25), key=lambda t: -lps3[t])[:6])
    assert sorted(rank for _, rank in out.logprobs[3].values()) == [1, 2, 3, 4, 5, 6]
    for i in (0, 2, 3):
        lps = raw_logprobs(logits[i].tolist())
        for t, (value, rank) in out.logprobs[i].items():
            assert value == pytest.approx(lps[t], abs=1e-5)
            assert rank == expected_rank(lps, t)


def test_no_logprobs_requested_gives_none():
    out = decoder().decode([request(temperature=0.0), request("b")], rows(ROW, 2))
    assert out.logprobs is None


def test_logprob_values_are_normalised_log_probabilities():
    row = [math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]
    out = decoder().decode([request(temperature=0.0, logprobs=4)], rows([x + 7.0 for x in row], 1))
    got = out.logprobs[0]
    assert got[0][0] == pytest.approx(math.log(0.5), abs=1e-6)
    assert got[1][0] == pytest.approx(math.log(0.25), abs=1e-6)
    assert got[2][0] == pytest.approx(math.log(0.125), abs=1e-6)
    assert got[3][0] == pytest.approx(math.log(0.125), abs=1e-6)
    assert got[0][1] == 1 and got[1][1] == 2
