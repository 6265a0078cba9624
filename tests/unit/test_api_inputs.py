"""The Python API's argument checks (framework/api/inputs.py): each bad argument raises TypeError or
ValueError naming it as the caller wrote it; good arguments pass through unchanged. No model."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from framework.api.inputs import (
    chat_messages, priorities_list, prompts_list, sampling_params_list, scheduling, tenants_list, token_prompt, ttft_slos_list,
)
from framework.sampling_params import SamplingParams, short_repr


def _id(value) -> str:
    return short_repr(value)[:40]


# ---- prompts -----------------------------------------------------------------------------------

# (bad prompt, exception, the element named after `prompts[3]` or `prompt`)
BAD_PROMPTS = [
    (None, TypeError, ""),
    (b"hello", TypeError, ""),
    (bytearray(b"hi"), TypeError, ""),
    ({"prompt": "hi"}, TypeError, ""),
    ({1, 2}, TypeError, ""),
    (5, TypeError, ""),
    (1.5, TypeError, ""),
    (np.array([1, 2, 3]), TypeError, ""),
    (torch.tensor([1, 2, 3]), TypeError, ""),
    (iter([1, 2]), TypeError, ""),
    ([1.0, 2.0], TypeError, "[0]"),
    ([1, 2, 3.0], TypeError, "[2]"),
    ([1, True], TypeError, "[1]"),
    ([False], TypeError, "[0]"),
    ([1, None], TypeError, "[1]"),
    ([1, "2"], TypeError, "[1]"),
    ([[1, 2], [3]], TypeError, "[0]"),
    ([1, [2]], TypeError, "[1]"),
    ([1, np.int64(2)], TypeError, "[1]"),
    ([torch.tensor(1)], TypeError, "[0]"),
    (["a", "b"], TypeError, "[0]"),
    ([1, 2**63], ValueError, "[1]"),  # beyond an int64 tensor
    ([-(2**63) - 1], ValueError, "[0]"),
    ([10**5000], ValueError, "[0]"),  # too long even for repr()
]


@pytest.mark.parametrize(("prompt", "error", "element"), BAD_PROMPTS, ids=[_id(p) for p, _, _ in BAD_PROMPTS])
def test_bad_prompt_raises_naming_it(prompt, error, element):
    with pytest.raises(error, match="^" + re.escape(f"prompts[3]{element} ")) as caught:
        token_prompt(prompt, 3)
    assert len(str(caught.value)) < 300
    with pytest.raises(error, match="^" + re.escape(f"prompt{element} ")):
        token_prompt(prompt)


@pytest.mark.parametrize("prompt", [np.array([1, 2]), torch.tensor([1, 2]), [np.int64(1)], [torch.tensor(1)]])
def test_arrays_and_tensors_are_told_to_use_tolist(prompt):
    with pytest.raises(TypeError, match=re.escape(".tolist()")):
        token_prompt(prompt, 0)


def test_nested_list_message_says_a_prompt_is_flat():
    with pytest.raises(TypeError, match="one flat list"):
        token_prompt([[1, 2]], 0)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello", ("hello", None)),
        ("", ("", None)),  # emptiness is the executor's to report ("the prompt is empty")
        ([5, 6, 7], (None, [5, 6, 7])),
        ((5, 6, 7), (None, [5, 6, 7])),
        ([], (None, [])),
        ([0, -1, 99999999], (None, [0, -1, 99999999])),  # the vocabulary range is the executor's
        ([2**63 - 1, -(2**63)], (None, [2**63 - 1, -(2**63)])),
    ],
)
def test_good_prompt_passes_through(prompt, expected):
    assert token_prompt(prompt, 0) == expected
    text, ids = token_prompt(prompt)
    if ids is not None:
        assert ids is not prompt  # a fresh list: the caller's is not aliased


@pytest.mark.parametrize(
    ("prompts", "expected"),
    [
        ("hi", ["hi"]),
        ([5, 6], [[5, 6]]),
        ((5, 6), [(5, 6)]),
        ([5.0, 6], [[5.0, 6]]),  # one prompt; token_prompt then names its float
        (["a", "b"], ["a", "b"]),
        ([[1, 2], [3]], [[1, 2], [3]]),
        (["a", [1, 2]], ["a", [1, 2]]),
        ([], []),
    ],
)
def test_prompts_list(prompts, expected):
    assert prompts_list(prompts) == expected


@pytest.mark.parametrize("prompts", [None, b"hi", {"a": 1}, 5, np.array([1, 2]), torch.tensor([[1, 2]]), iter(["a"])])
def test_prompts_list_rejects_naming_prompts(prompts):
    with pytest.raises(TypeError, match=r"^prompts must be"):
        prompts_list(prompts)


# ---- sampling_params ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ({"temperature": 0.0}, "sampling_params"),
        ("greedy", "sampling_params"),
        (0.5, "sampling_params"),
        (iter([SamplingParams()]), "sampling_params"),
        ([SamplingParams(), {"temperature": 0.0}], "sampling_params[1]"),
        ([None, SamplingParams()], "sampling_params[0]"),
        ((SamplingParams(), "x"), "sampling_params[1]"),
    ],
    ids=lambda v: _id(v),
)
def test_sampling_params_of_the_wrong_type_are_rejected(value, name):
    with pytest.raises(TypeError, match="^" + re.escape(f"{name} must be a SamplingParams(...)")) as caught:
        sampling_params_list(value, 2)
    if isinstance(value, dict) or isinstance(value, list) and any(isinstance(v, dict) for v in value):
        assert "SamplingParams(**options)" in str(caught.value)


@pytest.mark.parametrize("count, given", [(3, 2), (1, 2), (2, 0)])
def test_sampling_params_of_the_wrong_length_are_rejected(count, given):
    with pytest.raises(ValueError, match=rf"^sampling_params has {given} entries for {count} prompts"):
        sampling_params_list([SamplingParams()] * given, count)


def test_sampling_params_mutated_after_construction_are_validated_again():
    bad = SamplingParams()
    bad.temperature = float("nan")
    with pytest.raises(ValueError, match=r"^sampling_params: temperature\b"):
        sampling_params_list(bad, 2)
    with pytest.raises(ValueError, match=r"^sampling_params\[1\]: temperature\b"):
        sampling_params_list([SamplingParams(), bad], 2)
    bad.temperature, bad.ignore_eos = 0.0, None
    with pytest.raises(ValueError, match=r"^sampling_params: ignore_eos\b"):
        sampling_params_list(bad, 1)


def test_good_sampling_params_pass_through():
    assert sampling_params_list(None, 3) == [SamplingParams()] * 3
    assert sampling_params_list(None, 0) == []
    one = SamplingParams(temperature=0.0)
    assert all(p is one for p in sampling_params_list(one, 3))
    many = (SamplingParams(max_tokens=1), SamplingParams(max_tokens=2))
    got = sampling_params_list(many, 2)
    assert isinstance(got, list) and got[0] is many[0] and got[1] is many[1]


# ---- chat messages -----------------------------------------------------------------------------

# (bad messages, exception, the name the message starts with)
BAD_MESSAGES = [
    (None, TypeError, "messages"),
    ("hello", TypeError, "messages"),
    ({"role": "user", "content": "hi"}, TypeError, "messages"),
    ([], ValueError, "messages"),
    (["hello"], TypeError, "messages[0]"),
    ([{"role": "user", "content": "a"}, None], TypeError, "messages[1]"),
    ([{"content": "hi"}], TypeError, "messages[0].role"),
    ([{"role": None, "content": "hi"}], TypeError, "messages[0].role"),
    ([{"role": 1, "content": "hi"}], TypeError, "messages[0].role"),
    ([{"role": "bot", "content": "hi"}], ValueError, "messages[0].role"),
    ([{"role": "User", "content": "hi"}], ValueError, "messages[0].role"),
    ([{"role": "user"}], ValueError, "messages[0].content"),
    ([{"role": "user", "content": None}], ValueError, "messages[0].content"),
    ([{"role": "system", "content": None}], ValueError, "messages[0].content"),
    ([{"role": "user", "content": 5}], TypeError, "messages[0].content"),
    ([{"role": "user", "content": b"hi"}], TypeError, "messages[0].content"),
    ([{"role": "user", "content": {"type": "text", "text": "hi"}}], TypeError, "messages[0].content"),
    ([{"role": "user", "content": ["hi"]}], TypeError, "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], ValueError, "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"text": "hi"}]}], ValueError, "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], TypeError, "messages[0].content[0].text"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": [{"type": "text"}]}], TypeError, "messages[1].content[0].text"),
]


@pytest.mark.parametrize(("messages", "error", "name"), BAD_MESSAGES, ids=[_id(m) for m, _, _ in BAD_MESSAGES])
def test_bad_messages_raise_naming_the_part(messages, error, name):
    with pytest.raises(error, match="^" + re.escape(name) + " "):
        chat_messages(messages)


def test_role_message_lists_the_roles():
    with pytest.raises(ValueError, match="system, user, assistant, tool, developer; got 'bot'"):
        chat_messages([{"role": "bot", "content": "hi"}])


def test_good_messages_pass_through_as_templates_read_them():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant"},
        {"role": "user", "content": ""},
    ]
    original = [dict(m) for m in messages]
    assert chat_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        {"role": "system", "content": "ab"},  # as the server sends it: developer is read as system
        {"role": "assistant", "content": ""},
        {"role": "user", "content": ""},
    ]
    assert messages == original  # the caller's dicts are not changed
    assert chat_messages(({"role": "user", "content": "x"},)) == [{"role": "user", "content": "x"}]


# ---- priority ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "error", "name"),
    [
        (3, TypeError, "priority"),
        ("1", TypeError, "priority"),
        ({0: 1, 1: 2}, TypeError, "priority"),
        (np.array([1, 2]), TypeError, "priority"),
        ([1, True], TypeError, "priority[1]"),
        ([1.0, 2], TypeError, "priority[0]"),
        ([1, None], TypeError, "priority[1]"),
        ([1, "2"], TypeError, "priority[1]"),
        ([1], ValueError, "priority"),
        ([1, 2, 3], ValueError, "priority"),
    ],
    ids=_id,
)
def test_bad_priority_raises_naming_it(priority, error, name):
    with pytest.raises(error, match="^" + re.escape(name) + " "):
        priorities_list(priority, 2)


def test_good_priority_passes_through():
    assert priorities_list(None, 2) == [None, None]
    assert priorities_list([3, -1], 2) == [3, -1]
    assert priorities_list((0, 2**70), 2) == [0, 2**70]
    assert priorities_list([], 0) == []


# ---- tenant and ttft_slo_ms ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "values", "error", "name"),
    [
        (tenants_list, "acme", TypeError, "tenant"),  # one str is not a list of them
        (tenants_list, ["a", 3], TypeError, "tenant[1]"),
        (tenants_list, ["a", None], TypeError, "tenant[1]"),
        (tenants_list, ["", "b"], ValueError, "tenant[0]"),
        (tenants_list, ["a"], ValueError, "tenant"),
        (ttft_slos_list, 100, TypeError, "ttft_slo_ms"),
        (ttft_slos_list, [100, "5"], TypeError, "ttft_slo_ms[1]"),
        (ttft_slos_list, [True, 5], TypeError, "ttft_slo_ms[0]"),
        (ttft_slos_list, [0, 5], ValueError, "ttft_slo_ms[0]"),
        (ttft_slos_list, [5, -1.5], ValueError, "ttft_slo_ms[1]"),
        (ttft_slos_list, [5, float("nan")], ValueError, "ttft_slo_ms[1]"),
        (ttft_slos_list, [float("inf"), 5], ValueError, "ttft_slo_ms[0]"),
        (ttft_slos_list, [5, 5, 5], ValueError, "ttft_slo_ms"),
    ],
    ids=_id,
)
def test_bad_scheduling_lists_raise_naming_the_entry(check, values, error, name):
    with pytest.raises(error, match="^" + re.escape(name) + " "):
        check(values, 2)


def test_good_scheduling_lists_pass_through():
    assert tenants_list(None, 2) == [None, None]
    assert tenants_list(("a", "b"), 2) == ["a", "b"]
    assert ttft_slos_list([250, 0.5], 2) == [250, 0.5]
    assert ttft_slos_list([10**400], 1) == [10**400]  # an int too large for a float is still a deadline


def test_one_requests_scheduling_metadata_is_checked_by_name():
    assert scheduling() == {"priority": None, "tenant": None, "ttft_slo_ms": None}
    assert scheduling(-2, "acme", 300.0) == {"priority": -2, "tenant": "acme", "ttft_slo_ms": 300.0}
    for kwargs, error, name in [({"priority": 1.0}, TypeError, "priority"), ({"tenant": b"x"}, TypeError, "tenant"),
                                ({"tenant": ""}, ValueError, "tenant"), ({"ttft_slo_ms": 0}, ValueError, "ttft_slo_ms")]:
        with pytest.raises(error, match="^" + name + " "):
            scheduling(**kwargs)


def test_inputs_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, framework.api.inputs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env={"HF_HUB_OFFLINE": "1"}).returncode == 0
