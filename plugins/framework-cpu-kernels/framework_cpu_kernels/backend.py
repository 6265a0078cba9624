"""The `cpu_kernels` backend: the C++ kernels (kernels.py) for every hot op of a step on CPUs with
AVX-512 (AVX512-BF16 for bfloat16), decode-only steps replayed from recorded CPU graphs (graphs.py),
and what they read all over each step, packed weights and the KV cache, in 2 MB pages (huge_pages.py).
Prompt-sized linear layers stay with oneDNN, through the `torch` backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.backend.base import Backend
from framework.backend.torch_backend import TorchBackend
from framework.layers.attention import pad_tables, shared_columns, slot_mapping
from framework_cpu_kernels import huge_pages
from framework_cpu_kernels.config import CPUKernelsConfig
from framework_cpu_kernels.graphs import CPUDecodeGraphs
from framework_cpu_kernels.kernels import SUFFIXES, load

TABLE_COLUMNS = 16  # a decode graph's block tables are this many columns wider at a time


@dataclass
class KernelMetadata:
    """The whole step for the attention kernel, which reads the block tables itself."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    block_tables: torch.Tensor  # [b, max_blocks] int32, in packed order
    query_lens: torch.Tensor  # [b] int32: tokens of each request in the step
    context_lens: torch.Tensor  # [b] int32: positions its last token sees
    shared_blocks: int  # leading block-table columns that every row has in common


@dataclass
class PackedLinear:
    kernel: torch.Tensor | None  # the kernels' panel layout (decode-sized inputs)
    onednn: torch.Tensor | None  # oneDNN's layout (prompt-sized inputs)


class CPUKernelsBackend(Backend):
    name = "cpu_kernels"
    priority = 10  # above `torch`, wherever the kernels run

    def __init__(self, engine_config, config, device, dtype):
        super().__init__(engine_config, config or CPUKernelsConfig(), device, dtype)
        self.kernels = load()
        if self.kernels is None:
            raise RuntimeError("the CPU kernels could not be built (see the log)")
        self.torch = TorchBackend(engine_config, None, device, dtype)  # oneDNN's linear for prompt chunks

    @classmethod
    def supports(cls, device, dtype, head_dim: int) -> bool:
        """On CPU only, for float32 (AVX-512) or bfloat16 (AVX512-BF16) and the attention kernel's head
        sizes; builds the kernels (or finds them cached) to ask what the build covers."""
        if device.type != "cpu":
            return False
        kernels = load()
        return kernels is not None and kernels.supports(dtype, head_dim)

    def kv_cache_tensor(self, shape):
        # blocks are read from all over the cache: 2 MB pages, made now rather than at first use
        return huge_pages.zeros(shape, self.dtype, touch=True)

    def prepare_linear(self, weight):
        return PackedLinear(self.kernels.pack_linear(weight), self.torch.prepare_linear(weight))

    def linear(self, x, weight, bias, prepared):
        if prepared is not None and prepared.kernel is not None:
            y = self.kernels.linear(x, prepared.kernel, weight.shape[0], bias)
            if y is not None:
                return y
        return self.torch.linear(x, weight, bias, None if prepared is None else prepared.onednn)

    def rms_norm(self, x, weight, eps):
        return self.kernels.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self.kernels.rms_norm(x, weight, eps, residual), residual

    def rotary_and_cache(self, qkv, cos_sin, k_cache, v_cache, meta, num_heads, num_kv_heads):
        self.kernels.rope_and_cache(qkv, cos_sin, k_cache, v_cache, meta.slot_mapping, num_heads, num_kv_heads)
        return qkv[:, : num_heads * cos_sin.shape[-1]].view(qkv.shape[0], num_heads, cos_sin.shape[-1])

    def silu_and_mul(self, gate_up):
        return self.kernels.silu_and_mul(gate_up)

    def attention_metadata(self, positions, block_tables, query_lens, context_lens, cache_shape, table_columns: int = 1):
        tables = pad_tables(block_tables, table_columns)
        return KernelMetadata(
            slot_mapping=slot_mapping(positions, tables, query_lens, cache_shape[2]),
            block_tables=tables.to(torch.int32),
            query_lens=query_lens.to(torch.int32),
            context_lens=context_lens.to(torch.int32),
            shared_blocks=shared_columns(tables),
        )

    def attention(self, q, k_cache, v_cache, meta, scale):
        m = meta
        return self.kernels.attention(q, k_cache, v_cache, m.block_tables, m.query_lens, m.context_lens, m.shared_blocks, scale)

    def argmax(self, logits):
        if logits.dim() == 2 and logits.is_cpu and logits.is_contiguous() and logits.dtype in SUFFIXES:
            return self.kernels.argmax(logits)
        return logits.argmax(dim=-1)

    def decode_graphs(self, model, kv_caches, block_size, max_model_len):
        return KernelDecodeGraphs(self, model, kv_caches) if self.config.cpu_graphs else None


class KernelDecodeGraphs:
    """Decode-only steps of any shape, each recorded as a CPU graph the second time its shapes come
    (graphs.py) and replayed from then on."""

    def __init__(self, backend: CPUKernelsBackend, model, kv_caches):
        self.backend, self.model, self.kv_caches = backend, model, kv_caches
        self.graphs = CPUDecodeGraphs(backend.kernels, kv_caches)

    def covers(self, batch: int, width: int, query_len: int = 1) -> bool:
        return True

    def run(self, tokens, positions, tables, query_len=1):
        input_ids = torch.tensor(tokens, dtype=torch.long)
        starts = torch.tensor(positions, dtype=torch.long)
        positions = (starts[:, None] + torch.arange(query_len)).flatten()
        query_lens = torch.full((len(starts),), query_len, dtype=torch.long)
        # the tables widen TABLE_COLUMNS at a time, so that a request's graph lasts that many blocks
        meta = self.backend.attention_metadata(positions, tables, query_lens, starts + query_len, self.kv_caches[0][0].shape, TABLE_COLUMNS)
        key = (len(tokens), query_len, meta.block_tables.shape[1], meta.shared_blocks)
        inputs = [input_ids, positions, meta.slot_mapping, meta.block_tables, meta.query_lens, meta.context_lens]
        logits = self.graphs.run(key, lambda: self.model.compute_logits(self.model(input_ids, positions, meta, self.kv_caches)), inputs)
        return logits.to(torch.float32, copy=True)  # (the next replay overwrites the graph's output)
