"""Weights reach their parameters through the layer that owns them: q/k/v and gate/up fused in
place, Gemma's norms stored as 1 + w, and a checkpoint missing a part or shaped wrong is refused."""

from __future__ import annotations

import pytest
import torch

from framework.backend.torch_backend import TorchBackend


def build(model_class, hf_class, config):
    torch.manual_seed(0)
    hf = hf_class(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    backend = TorchBackend(None, None, torch.device("cpu"), torch.float32)
    return model_class(config, backend), {k: v.clone() for k, v in hf.state_dict().items()}


@pytest.fixture
def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM as HF

    from framework.models.qwen2 import Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return build(Qwen2ForCausalLM, HF, config)


def test_fused_projections_take_their_parts_in_place(qwen2):
    model, state = qwen2
    model.load_weights(state.items())
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    for leaf in ("weight", "bias"):
        want = torch.cat([state[f"model.layers.1.self_attn.{p}_proj.{leaf}"] for p in "qkv"])
        assert torch.equal(getattr(attn.qkv_proj, leaf), want)
    assert attn.o_proj.bias is None  # Qwen 2: no bias on the output projection
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([state["model.layers.1.mlp.gate_proj.weight"], state["model.layers.1.mlp.up_proj.weight"]]))
    assert model.lm_head.weight is model.embed_tokens.weight  # tied


def test_a_missing_part_is_named(qwen2):
    model, state = qwen2
    del state["model.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"lacks weights for: layers\.0\.self_attn\.qkv_proj\.bias"):
        model.load_weights(state.items())


def test_a_wrong_shape_names_the_checkpoint_tensor(qwen2):
    model, state = qwen2
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 32)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: checkpoint shape \(3, 32\)"):
        model.load_weights(state.items())


def test_an_unknown_tensor_is_refused(qwen2):
    model, state = qwen2
    with pytest.raises(KeyError, match="model.layers.0.self_attn.extra.weight"):
        model.load_weights([*state.items(), ("model.layers.0.self_attn.extra.weight", torch.zeros(1))])


def test_gemma_norms_hold_one_plus_the_checkpoint_weight():
    from transformers import Gemma3ForCausalLM as HF, Gemma3TextConfig

    from framework.models.gemma3 import Gemma3ForCausalLM

    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model, state = build(Gemma3ForCausalLM, HF, config)
    model.load_weights(state.items())
    assert torch.equal(model.layers[0].pre_feedforward_layernorm.weight, state["model.layers.0.pre_feedforward_layernorm.weight"] + 1)
    assert torch.equal(model.layers[0].self_attn.k_norm.weight, state["model.layers.0.self_attn.k_norm.weight"] + 1)
    assert torch.equal(model.norm.weight, state["model.norm.weight"] + 1)
