"""SamplingParams: every field is validated (ValueError naming the field, for a wrong type as for a
value out of range), the limits on `n`, `stop`, `stop_token_ids` and logprobs, normalisations of
`stop` and `top_k`, boundary values accepted, and the derived `greedy` / `has_penalties` flags."""

from __future__ import annotations

import re

import pytest

from framework.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    short_repr,
)

FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]
BOOL_FIELDS = ["include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "detokenize"]

# (field, invalid value); each must raise ValueError whose message starts with the field's name
INVALID = [
    ("n", 0),
    ("n", -1),
    ("n", 1.0),
    ("n", True),
    ("n", None),
    ("max_tokens", 0),
    ("max_tokens", 2.5),
    ("max_tokens", "16"),
    ("min_tokens", -1),
    ("min_tokens", 1.0),
    ("temperature", -0.1),
    ("temperature", "1"),
    ("temperature", None),
    ("temperature", True),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", None),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.0001),
    ("top_p", 2),
    ("top_p", "0.9"),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("min_p", None),
    ("seed", 1.0),
    ("seed", "1"),
    ("seed", True),
    ("seed", -(2**63) - 1),
    ("seed", 2**64),  # torch.Generator.manual_seed accepts at most 2**64 - 1
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", None),
    ("presence_penalty", -2.01),
    ("presence_penalty", 2.01),
    ("presence_penalty", "0"),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", 3),
    ("frequency_penalty", None),
    ("stop", [""]),
    ("stop", ["ok", ""]),
    ("stop", ["ok", 3]),
    ("stop", [None]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1, 2.0]),
    ("stop_token_ids", ["3"]),
    ("stop_token_ids", [True]),
    ("logprobs", -1),
    ("logprobs", 1.0),
    ("logprobs", True),
    ("prompt_logprobs", -1),
    ("prompt_logprobs", 2.0),
    # types and limits
    ("n", MAX_N + 1),
    ("n", 10**6),
    ("n", -5),
    ("n", "2"),
    ("max_tokens", None),
    ("max_tokens", True),
    ("min_tokens", True),
    ("min_tokens", None),
    ("top_k", -1.0),  # only the integer -1 means "all tokens"
    ("top_k", True),
    ("top_k", 2**63),  # beyond an int64 tensor
    ("seed", 10**5000),  # too long even for repr()
    ("seed", 2**200),
    ("seed", float("nan")),
    ("stop", 5),
    ("stop", 1.5),
    ("stop", [1]),
    ("stop", b"ab"),
    ("stop", {"a": 1}),
    ("stop", [["a"]]),
    ("stop", ["x"] * (MAX_STOP_STRINGS + 1)),
    ("stop", ["ok", "x" * (MAX_STOP_STRING_CHARS + 1)]),
    ("stop_token_ids", 5),
    ("stop_token_ids", "12"),
    ("stop_token_ids", {1: 2}),
    ("stop_token_ids", [None]),
    ("stop_token_ids", list(range(MAX_STOP_TOKEN_IDS + 1))),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", "5"),
    ("prompt_logprobs", MAX_LOGPROBS + 1),
    ("prompt_logprobs", True),
]
INVALID += [(name, bad) for name in FLOAT_FIELDS for bad in (float("nan"), float("inf"), float("-inf"), 10**400, True, False)]
INVALID += [(name, bad) for name in BOOL_FIELDS for bad in (None, "yes", "", 1, 0, 1.0, [True])]


def _id(name, value):
    return f"{name}={short_repr(value)[:40]}"


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[_id(n, v) for n, v in INVALID])
def test_invalid_value_raises_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b") as caught:
        SamplingParams(**{name: value})
    assert len(str(caught.value)) < 200  # huge values are shown truncated


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"n": MAX_N + 1}, f"at most {MAX_N}"),
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, f"at most {MAX_STOP_STRINGS}"),
        ({"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, f"at most {MAX_STOP_STRING_CHARS}"),
        ({"stop_token_ids": [0] * (MAX_STOP_TOKEN_IDS + 1)}, f"at most {MAX_STOP_TOKEN_IDS}"),
        ({"logprobs": MAX_LOGPROBS + 1}, f"[0, {MAX_LOGPROBS}]"),
        ({"temperature": float("nan")}, "finite"),
        ({"ignore_eos": "yes"}, "True or False"),
        ({"stop": ["ok", 3]}, "stop[1]"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids[1]"),
    ],
)
def test_limit_and_type_messages_say_what_is_allowed(kwargs, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("name", "value"),
    [("top_p", 0.0), ("temperature", float("nan")), ("ignore_eos", "yes"), ("stop", "x"), ("stop", None), ("stop_token_ids", 7), ("n", 500)],
)
def test_invalid_value_set_after_construction_is_caught_by_validate(name, value):
    params = SamplingParams()
    setattr(params, name, value)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        params.validate()


@pytest.mark.parametrize(("min_tokens", "max_tokens"), [(5, 4), (17, 16), (2, 1)])
def test_min_tokens_above_max_tokens_raises(min_tokens, max_tokens):
    with pytest.raises(ValueError, match=r"min_tokens.*max_tokens"):
        SamplingParams(min_tokens=min_tokens, max_tokens=max_tokens)


def test_first_invalid_field_is_reported():
    with pytest.raises(ValueError, match=r"^n\b"):
        SamplingParams(n=0, temperature=-1.0, top_p=0.0)


VALID = [
    {"n": 1},
    {"n": 8},
    {"max_tokens": 1},
    {"min_tokens": 16, "max_tokens": 16},
    {"min_tokens": 0},
    {"temperature": 0},
    {"temperature": 0.0},
    {"temperature": 100.0},
    {"top_k": 0},
    {"top_k": 1},
    {"top_p": 1.0},
    {"top_p": 1},
    {"top_p": 1e-6},
    {"min_p": 0.0},
    {"min_p": 1.0},
    {"seed": 0},
    {"seed": -(2**63)},
    {"seed": 2**64 - 1},
    {"seed": None},
    {"repetition_penalty": 1e-3},
    {"repetition_penalty": 10.0},
    {"presence_penalty": -2.0},
    {"presence_penalty": 2.0},
    {"frequency_penalty": -2},
    {"frequency_penalty": 2},
    {"stop": ["a", "bc"]},
    {"stop_token_ids": [0, 2, 50000]},
    {"logprobs": 0},
    {"logprobs": 20},
    {"logprobs": None},
    {"prompt_logprobs": 0},
    {"prompt_logprobs": 5},
    {"n": MAX_N},
    {"top_k": 2**63 - 1},
    {"stop": ["x"] * MAX_STOP_STRINGS},
    {"stop": ["x" * MAX_STOP_STRING_CHARS]},
    {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))},
    {"logprobs": MAX_LOGPROBS},
    {"prompt_logprobs": MAX_LOGPROBS},
    {"include_stop_str_in_output": True},
    {"ignore_eos": True},
    {"skip_special_tokens": False},
]


@pytest.mark.parametrize("kwargs", VALID, ids=[repr(v)[:60] for v in VALID])
def test_boundary_values_are_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(params, name) == value


def test_stop_string_becomes_a_list():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]


def test_stop_and_stop_token_ids_normalised_to_fresh_lists():
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    stops = ["a"]
    params = SamplingParams(stop=stops)
    params.stop.append("b")
    assert stops == ["a"]  # the caller's list is not aliased
    assert SamplingParams().stop == [] and SamplingParams().stop is not SamplingParams().stop


def test_stop_string_empty_rejected():
    with pytest.raises(ValueError, match=r"^stop\b"):
        SamplingParams(stop="")


def test_top_k_minus_one_means_all_tokens():
    assert SamplingParams(top_k=-1).top_k == 0


def test_defaults():
    params = SamplingParams()
    assert (params.n, params.max_tokens, params.min_tokens) == (1, 16, 0)
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (1.0, 0, 1.0, 0.0)
    assert params.seed is None and params.logprobs is None and params.prompt_logprobs is None
    assert params.skip_special_tokens and not params.ignore_eos and not params.include_stop_str_in_output


def test_greedy_flag():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    assert not SamplingParams().greedy


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, False),
        ({"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}, False),
        ({"repetition_penalty": 1.1}, True),
        ({"repetition_penalty": 0.9}, True),
        ({"presence_penalty": 0.5}, True),
        ({"presence_penalty": -0.5}, True),
        ({"frequency_penalty": 0.1}, True),
        ({"frequency_penalty": -2.0}, True),
        ({"temperature": 0.0, "top_k": 5, "top_p": 0.5, "min_p": 0.1}, False),
    ],
)
def test_has_penalties(kwargs, expected):
    assert SamplingParams(**kwargs).has_penalties is expected
