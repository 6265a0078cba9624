"""Checks of the Python API's arguments, before anything is tokenized or queued.

Each function raises TypeError (the wrong kind of object) or ValueError (the right kind with a bad
value) with a message naming the argument as the caller wrote it: `prompts[2]`, `sampling_params`,
`messages[0].role`. Nothing here knows the model: token ids are checked against the vocabulary, and
prompt lengths against the model, by the executor's `validate`.
"""

from __future__ import annotations

import math

from framework.sampling_params import INT64_MAX, INT64_MIN, SamplingParams, plain_ints_within, short_repr

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def prompts_list(prompts) -> list:
    """`generate`'s prompts as a list: one prompt (a str or a list of token ids) becomes [prompt]."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(
            f"prompts must be a str, a list of int token ids, or a list of those; got {_got(prompts)}{_tolist_hint(prompts)}"
        )
    if prompts and isinstance(prompts[0], (int, float)):  # one prompt of token ids (token_prompt checks them)
        return [prompts]
    return list(prompts)


def token_prompt(prompt, index: int | None = None) -> tuple[str | None, list[int] | None]:
    """(text, None) for a str, (None, ids) for a list or tuple of int token ids; else an error naming it."""
    name = "prompt" if index is None else f"prompts[{index}]"
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{name} is not valid text: {exc.reason} at character {exc.start}") from None
        return prompt, None
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"{name} must be a str or a list of int token ids, got {_got(prompt)}{_tolist_hint(prompt)}")
    if plain_ints_within(prompt, INT64_MIN, INT64_MAX):
        return None, list(prompt)
    for j, token in enumerate(prompt):
        if not _is_int(token):
            hint = " (a prompt is one flat list of ids)" if isinstance(token, (list, tuple)) else _tolist_hint(token)
            raise TypeError(f"{name}[{j}] must be an int token id, got {_got(token)}{hint}")
        if not INT64_MIN <= token <= INT64_MAX:  # the range check against the vocabulary is the executor's
            raise ValueError(f"{name}[{j}] is not a token id, got {short_repr(token)}")
    return None, list(prompt)


def sampling_params_list(sampling_params, count: int) -> list[SamplingParams]:
    """One validated SamplingParams per prompt, from None (defaults), one for all, or one each."""
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        _validate(sampling_params, "sampling_params")
        return [sampling_params] * count
    if not isinstance(sampling_params, (list, tuple)):
        got = f"{_got(sampling_params)}{_params_hint(sampling_params)}"
        raise TypeError(f"sampling_params must be a SamplingParams(...) or a list of them (one per prompt), got {got}")
    for i, params in enumerate(sampling_params):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params[{i}] must be a SamplingParams(...), got {_got(params)}{_params_hint(params)}")
    if len(sampling_params) != count:
        raise ValueError(
            f"sampling_params has {len(sampling_params)} entries for {count} prompts; give one per prompt, or one SamplingParams for all"
        )
    for i, params in enumerate(sampling_params):
        _validate(params, f"sampling_params[{i}]")
    return list(sampling_params)


def chat_messages(messages) -> list[dict]:
    """Check a conversation; return copies as chat templates read them (as the server sends them)."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {_got(messages)}")
    if not messages:
        raise ValueError("messages is empty; a conversation needs at least one message")
    return [_chat_message(message, i) for i, message in enumerate(messages)]


def priorities_list(priority, count: int) -> list[int | None]:
    """One priority per prompt (lower is more important): None (all unset) or a list of ints."""
    return _per_prompt(priority, count, "priority", "ints", priority_value)


def tenants_list(tenant, count: int) -> list[str | None]:
    """One tenant per prompt: None (all unset) or a list of non-empty strs."""
    return _per_prompt(tenant, count, "tenant", "strs", tenant_value)


def ttft_slos_list(ttft_slo_ms, count: int) -> list[float | None]:
    """One time-to-first-token deadline per prompt, in ms: None (all unset) or a list of numbers > 0."""
    return _per_prompt(ttft_slo_ms, count, "ttft_slo_ms", "numbers of milliseconds", ttft_slo_value)


def scheduling(priority=None, tenant=None, ttft_slo_ms=None) -> dict:
    """One request's scheduling metadata, checked (each may be None: unset), as LlmRequest fields."""
    for value, check in ((priority, priority_value), (tenant, tenant_value), (ttft_slo_ms, ttft_slo_value)):
        if value is not None:
            check(value)
    return {"priority": priority, "tenant": tenant, "ttft_slo_ms": ttft_slo_ms}


def priority_value(value, name: str = "priority") -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {_got(value)}")


def tenant_value(value, name: str = "tenant") -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {_got(value)}")
    if not value:
        raise ValueError(f"{name} must not be empty (leave it unset for no tenant)")


def ttft_slo_value(value, name: str = "ttft_slo_ms") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of milliseconds, got {_got(value)}")
    if not (value > 0 and (isinstance(value, int) or math.isfinite(value))):
        raise ValueError(f"{name} must be a finite number of milliseconds > 0, got {short_repr(value)}")


# ---- helpers ------------------------------------------------------------------------------------
def _per_prompt(values, count: int, name: str, kind: str, check) -> list:
    """None (all unset) or a list of `count` values, each passing `check(value, "name[i]")`."""
    if values is None:
        return [None] * count
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of {kind} (one per prompt) or None, got {_got(values)}")
    for i, value in enumerate(values):
        check(value, f"{name}[{i}]")
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} prompts; give one per prompt")
    return list(values)


def _chat_message(message, i: int) -> dict:
    """Message `i`, checked, with its content as one str and `developer` read as `system`."""
    if not isinstance(message, dict):
        raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {_got(message)}")
    role = message.get("role")
    if not isinstance(role, str):
        raise TypeError(f"messages[{i}].role must be a str, got {_got(role)}")
    if role not in CHAT_ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {short_repr(role)}")
    content = message.get("content")
    if content is None and role != "assistant":
        raise ValueError(f"messages[{i}].content must be a str (only an assistant message may have none), got None")
    if isinstance(content, (list, tuple)):
        content = "".join(_text_part(part, f"messages[{i}].content[{j}]") for j, part in enumerate(content))
    elif content is not None and not isinstance(content, str):
        raise TypeError(f"messages[{i}].content must be a str or a list of text parts, got {_got(content)}")
    return {**message, "role": "system" if role == "developer" else role, "content": content or ""}


def _text_part(part, name: str) -> str:
    if not isinstance(part, dict):
        raise TypeError(f"{name} must be a {{'type': 'text', 'text': ...}} dict, got {_got(part)}")
    if part.get("type") != "text":
        raise ValueError(f"{name}.type must be 'text' (only text is read), got {short_repr(part.get('type'))}")
    if not isinstance(part.get("text"), str):
        raise TypeError(f"{name}.text must be a str, got {_got(part.get('text'))}")
    return part["text"]


def _validate(params: SamplingParams, name: str) -> None:
    """`params.validate()`, its message prefixed with where the caller passed it."""
    try:
        params.validate()
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _got(value) -> str:
    """`value` for a message, type first: `None`, `bytes b'hi'`, `numpy.ndarray array([1, 2])`."""
    if value is None:
        return "None"
    kind = type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name} {short_repr(value)}"


def _tolist_hint(value) -> str:
    return "; convert arrays and tensors with .tolist()" if hasattr(value, "tolist") else ""


def _params_hint(value) -> str:
    return "; build it with SamplingParams(**options)" if isinstance(value, dict) else ""
