"""The sizes of a Llama-family model that its step cost depends on, read from its config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from framework.models.checkpoint import head_dim_of


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, hf_config) -> ModelShape:
        heads = hf_config.num_attention_heads
        return cls(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim_of(hf_config),
            vocab_size=hf_config.vocab_size,
        )

    @property
    def layer_weights(self) -> int:
        """Weights of the linear layers of all decoder layers (what every computed token multiplies)."""
        h, d = self.hidden_size, self.head_dim
        attention = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        return self.num_layers * (attention + 3 * h * self.intermediate_size)

    @property
    def lm_head_weights(self) -> int:
        return self.hidden_size * self.vocab_size

    @property
    def kv_values_per_token(self) -> int:
        """K and V values one token keeps in the cache, over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def layer_flops(self, tokens: int) -> int:
        """The decoder layers' linear layers: a multiply and an add per weight and token."""
        return 2 * self.layer_weights * tokens

    def lm_head_flops(self, sampled: int) -> int:
        return 2 * self.lm_head_weights * sampled

    def attention_flops(self, attended: int) -> int:
        """Scores (q.k) and the weighted sum of values: 2 x 2 FLOPs per (query, key) pair, head and dimension."""
        return 4 * self.num_layers * self.num_heads * self.head_dim * attended

    def flops(self, tokens: int, sampled: int, attended: int) -> int:
        """A forward's arithmetic: `tokens` computed, `sampled` logits rows, `attended` (query, key) pairs."""
        return self.layer_flops(tokens) + self.lm_head_flops(sampled) + self.attention_flops(attended)

    def to_dict(self) -> dict:
        return asdict(self)
