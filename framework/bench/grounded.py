"""W5, input-grounded decode: one chat prompt whose greedy continuation reuses its own text.

The text is the source of the standard library's `textwrap.dedent`, read at run time with
`inspect.getsource` (1723 characters, 395 SmolLM2 tokens; identical in CPython 3.10, 3.11, 3.12
and 3.13, sha1 in `W5_SOURCE_SHA1`). The user asks SmolLM2-135M-Instruct, in its chat template
(default system prompt), to "Add type hints to this Python function and show the complete
function", with the function in a ```python fence: a request a user would really make, and one
whose answer should keep almost all of the input. The prompt is 444 tokens.

Why this one (docs/w5-notes.md has the measurements): of 20 prompt shapes tried (chat and plain
completion; copy, rename, type hints, comments, docstring; the Zen of Python, `dedent`,
`heapq.nsmallest`, `heapq._siftup`, `statistics.median`, `statistics.mode`,
`colorsys.hsv_to_rgb`, `difflib.SequenceMatcher.ratio`), this is the one whose greedy output is
the most reliably grounded. The model does not add the hints: it re-types the function
(docstring rewrapped, one slip), and about 91% of its 256 output tokens lie in spans of >= 8
tokens copied from the prompt, with no self-repetition loop. It runs to the 256-token limit (the
function is longer than that), so every run does the same work. Its greedy output is identical
in float32 and bfloat16 (transformers, CPU), whereas the other leading candidates diverged
between the two dtypes. Simulated prompt lookup (n-gram 1..4, latest match) advances
2.59 / 3.66 / 4.83 / 5.45 tokens per verify step for k = 2 / 4 / 6 / 8 on that output.

Possibly not stable beyond 3.13: CPython 3.14 is believed to have rewritten `textwrap.dedent`
for speed (not checked: no 3.14 was at hand). On a Python whose text differs, `w5_prompt` warns
and tests/unit/test_grounded_workload.py fails, so that no one compares W5 figures across
different prompts by accident.
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap
import warnings

W5_MAX_TOKENS = 256
# First 10 hex digits of sha1(inspect.getsource(textwrap.dedent)) in CPython 3.10-3.13.
W5_SOURCE_SHA1 = "db78a82e18"
W5_INSTRUCTION = "Add type hints to this Python function and show the complete function:"


def w5_source_text() -> str:
    """The stdlib text W5 is built from: the source of `textwrap.dedent`."""
    return inspect.getsource(textwrap.dedent)


def w5_user_message(source: str | None = None) -> str:
    source = w5_source_text() if source is None else source
    return f"{W5_INSTRUCTION}\n\n```python\n{source}```"


def w5_prompt(tokenizer) -> list[int]:
    """The W5 prompt as token ids: the user message in the tokenizer's chat template (with the
    generation prompt), tokenised without extra special tokens. Deterministic for a given tokenizer
    and Python standard library."""
    source = w5_source_text()
    digest = hashlib.sha1(source.encode()).hexdigest()[: len(W5_SOURCE_SHA1)]
    if digest != W5_SOURCE_SHA1:
        warnings.warn(
            f"textwrap.dedent's source differs from the one W5 was defined on (sha1 {digest}, "
            f"expected {W5_SOURCE_SHA1}, CPython 3.10-3.13): W5 figures are not comparable",
            stacklevel=2,
        )
    messages = [{"role": "user", "content": w5_user_message(source)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))
