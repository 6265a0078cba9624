"""The backend seam: the hot tensor ops that the models and the model engine call.

A model gets its backend at construction and its layers call `backend.<op>(...)`; the engine asks the
backend for a step's attention metadata, the KV cache tensors and decode-step graphs. Nothing above
the backend knows which one runs: `torch` is built in (`framework/backend/torch_backend.py`, CPU and
CUDA), the C++ CPU kernels are the first-party plugin `cpu_kernels`.

Shapes: a step's tokens are packed (no padding), `T` of them; a layer's K or V cache is
`[kv_heads, num_blocks, block_size, head_dim]`; `d` is the head size. Tensors are in the backend's
device and dtype unless a method says otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol


class DecodeGraphs(Protocol):
    """Decode-only steps captured once and replayed: every request adds its last token and samples
    it, or (a verify step) adds its last token and the `query_len - 1` drafts it verifies."""

    def covers(self, batch: int, width: int, query_len: int = 1) -> bool:
        """Whether a step of `batch` requests with block tables of at most `width` blocks, each
        adding `query_len` tokens, is replayed (else the engine runs it eagerly)."""

    def run(self, tokens: list[int], positions: list[int], tables: list[list[int]], query_len: int = 1):
        """Float32 logits `[len(tokens), vocab]` (a fresh tensor) of the step: request `i` adds
        `tokens[i * query_len : (i + 1) * query_len]` from `positions[i]` on, its K/V written into its
        block table `tables[i]`; one row per token."""


class Backend(ABC):
    """Built by the engine as `factory(engine_config, own_config, device, dtype)`, once the class said
    it `supports` the model."""

    name: str  # the name it registers under, reported by the engine (logs, bench JSON)
    priority: int = 0  # `engine.backend=auto` tries the higher first
    # what `variant_attention` implements: "sliding_window", "soft_cap"; a model whose layers use
    # one runs only on backends that list it (`CausalLM.attention_variants`)
    attention_variants: frozenset[str] = frozenset()

    def __init__(self, engine_config, config, device, dtype):
        self.engine_config = engine_config
        self.config = config  # the backend's own config dataclass (its fields sit in the `engine` group), or None
        self.device = device  # torch.device
        self.dtype = dtype  # torch.dtype of the weights, activations and KV cache

    @classmethod
    @abstractmethod
    def supports(cls, device, dtype, head_dim: int) -> bool:
        """Whether this backend runs a model of this head size in this dtype on this device here (it
        may check the CPU, build its kernels...). Called before the model is built."""

    # ---- memory --------------------------------------------------------------------------------
    def kv_cache_tensor(self, shape):
        """A zero-filled contiguous tensor of `shape` for one layer's K or V cache."""
        import torch

        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    # ---- linear layers -------------------------------------------------------------------------
    def prepare_linear(self, weight) -> Any:
        """A copy of a loaded weight `[out, in]` in the layout `linear` multiplies fastest from (packed
        once, kept beside the plain weight), or None where the backend has none. Called again after a
        weight changes."""
        return None

    @abstractmethod
    def linear(self, x, weight, bias, prepared):
        """`F.linear(x, weight, bias)` for `x` `[..., in]`, from `prepared` (what `prepare_linear`
        returned, possibly None)."""

    # ---- fused layer ops -----------------------------------------------------------------------
    @abstractmethod
    def rms_norm(self, x, weight, eps: float):
        """`weight * rmsnorm(x)` over the last dimension (normalised in float32, scaled in the dtype)."""

    @abstractmethod
    def add_rms_norm(self, x, residual, weight, eps: float):
        """`(rms_norm(x + residual), x + residual)`: the residual add fused into the norm. The backend
        may write the sum into `residual` and return it."""

    @abstractmethod
    def rotary_and_cache(self, qkv, cos_sin, k_cache, v_cache, meta, num_heads: int, num_kv_heads: int):
        """Rotate ("rotate half" layout) the query and key heads of a fused projection `qkv`
        `[T, (num_heads + 2 * num_kv_heads) * d]` by their tokens' `cos_sin` `[T, 2, d]`, write the
        keys and values into the caches at the step's slots (from `meta`), and return the rotated
        queries `[T, num_heads, d]`. `qkv` may be rotated in place (the queries then a view of it)."""

    @abstractmethod
    def silu_and_mul(self, gate_up):
        """SwiGLU of a fused `[..., 2 * width]` gate|up projection: `silu(gate) * up`, `[..., width]`."""

    def gelu_tanh_and_mul(self, gate_up):
        """`gelu_tanh(gate) * up` of a fused `[..., 2 * width]` gate|up projection (Gemma's MLP). The
        default runs PyTorch's ops, which any backend's tensors take."""
        from framework.layers.activation import gelu_tanh_and_mul

        return gelu_tanh_and_mul(gate_up)

    def qk_norm(self, qkv, q_weight, k_weight, eps: float, num_heads: int, num_kv_heads: int):
        """`qkv` `[T, (num_heads + 2 * num_kv_heads) * d]` with every query head RMS-normalised by
        `q_weight` `[d]` and every key head by `k_weight` (QK-norm, before the rotation). The default
        runs this backend's `rms_norm` over the heads as rows."""
        import torch

        head_dim = q_weight.shape[0]
        q_size, k_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, k_size, k_size], dim=-1)
        q = self.rms_norm(q.reshape(-1, head_dim), q_weight, eps).view(len(qkv), q_size)
        k = self.rms_norm(k.reshape(-1, head_dim), k_weight, eps).view(len(qkv), k_size)
        return torch.cat([q, k, v], dim=-1)

    # ---- attention -----------------------------------------------------------------------------
    @abstractmethod
    def attention_metadata(self, positions, block_tables: list[list[int]], query_lens, context_lens, cache_shape) -> Any:
        """What `attention` and `rotary_and_cache` need to know of a step, in the backend's own form.
        `positions` `[T]` int64 (CPU) of the packed tokens; per request, in packed order, its block
        table, its `query_lens` tokens in the step and the `context_lens` positions its last token
        sees (both `[b]` int64 CPU; a request's tokens are the last `query_lens` of its context);
        `cache_shape` is one layer's K cache shape. Requests may share leading blocks (a cached
        prefix); a backend may attend those once for all of them."""

    @abstractmethod
    def attention(self, q, k_cache, v_cache, meta, scale: float):
        """Causal attention of the packed queries `q` `[T, heads, d]` over each request's cached
        context (which already holds the step's own keys and values), with grouped KV heads:
        `[T, heads, d]`."""

    def variant_attention(self, q, k_cache, v_cache, meta, scale: float, sliding_window=None, soft_cap=None):
        """`attention` where each query sees only its own position and the `sliding_window - 1`
        before it, and/or the scores (already scaled) become `soft_cap * tanh(scores / soft_cap)`
        before the causal mask. Called only with the variants the class lists in
        `attention_variants`."""
        raise NotImplementedError(f"backend {self.name!r} implements no attention variants")

    # ---- sampling ------------------------------------------------------------------------------
    def argmax(self, logits):
        """`logits.argmax(dim=-1)` of `[rows, vocab]` logits (any dtype or device): the first of
        equal maxima, the first NaN, as int64."""
        return logits.argmax(dim=-1)

    # ---- decode-step graphs --------------------------------------------------------------------
    def decode_graphs(self, model, kv_caches, block_size: int, max_model_len: int) -> DecodeGraphs | None:
        """The capture/replay of decode-only steps of `model` over these caches, or None where the
        backend has none (every step then runs eagerly). Called again when the caches change."""
        return None
