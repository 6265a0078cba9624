"""W5 (input-grounded decode) prompt, with SmolLM2's tokenizer only: deterministic, a few hundred
tokens, holds the stdlib text it is built from, and that text is the one W5 was measured on."""

from __future__ import annotations

import hashlib
import warnings

import pytest

from framework.bench.grounded import (
    W5_MAX_TOKENS,
    W5_SOURCE_SHA1,
    w5_prompt,
    w5_source_text,
)


@pytest.fixture(scope="module")
def tok(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir))


def test_prompt_is_deterministic(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = w5_prompt(tok), w5_prompt(tok)
    assert first == second
    assert all(isinstance(t, int) for t in first)


def test_prompt_is_a_few_hundred_tokens(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = w5_prompt(tok)
    assert 200 <= len(ids) <= 600, len(ids)
    assert W5_MAX_TOKENS == 256


def test_prompt_contains_the_source_text(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = w5_prompt(tok)
    source = w5_source_text()
    assert source.startswith("def dedent(text):")
    assert source in tok.decode(ids)
    # The source's own tokens appear as one contiguous run (what prompt lookup will copy from).
    src_ids = tok.encode(source, add_special_tokens=False)
    inner = src_ids[1:-1]  # the first/last token may merge with the fence around it
    assert any(ids[i : i + len(inner)] == inner for i in range(len(ids) - len(inner) + 1))
    # A chat prompt that ends by opening the assistant's turn.
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_source_text_is_the_one_w5_was_measured_on():
    digest = hashlib.sha1(w5_source_text().encode()).hexdigest()[: len(W5_SOURCE_SHA1)]
    assert digest == W5_SOURCE_SHA1, (
        "textwrap.dedent's source changed in this Python (CPython 3.14 is believed to rewrite it): "
        "W5 needs re-measuring (docs/w5-notes.md) or pinning to another text"
    )
