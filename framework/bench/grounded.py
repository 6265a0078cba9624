"""W5, input-grounded decode: one chat prompt whose greedy continuation reuses its own text.

The text is the source of the standard library's `textwrap.dedent`, read at run time; the user
asks, in the checkpoint's chat template, to "Add type hints to this Python function and show the
complete function". SmolLM2-135M re-types the function, so most of its output can be looked up in
the prompt. Why this prompt, and what the model really outputs: docs/w5-notes.md. The source must
be the one W5 was defined on (`W5_SOURCE_SHA1`, CPython 3.10-3.13): on another, `w5_prompt` warns
and the workload's test fails, so that W5 figures are never compared across different prompts.
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
