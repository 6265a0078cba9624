"""The built-in model engine: packs a step's tokens into one ragged batch, builds the attention
metadata from the block tables, and runs the model."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

import torch

from framework.engine.base import ForwardOutput, ModelEngine
from framework.engine.cpu_graphs import CPUDecodeGraphs
from framework.engine.cuda_graphs import DecodeGraphs
from framework.kernels import cpu as cpu_kernels
from framework.layers.attention import AttentionGroup, AttentionMetadata, KernelTables, additive_mask, cache_rows
from framework.layers.linear import Linear
from framework.models.checkpoint import iter_weights, load_hf_config
from framework.resources.base import KVCacheSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU (exact, and what transformers uses by default), bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def keep_freed_cpu_memory() -> None:
    """Ask glibc to keep freed buffers up to 32 MiB for reuse instead of returning them to the OS:
    otherwise every step's large temporaries (activations, logits) are fresh pages, each faulted in
    and zeroed again (~370k page faults per W1 run). No-op without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def keep_onednn_primitives(capacity: int = 8192) -> None:
    """Let oneDNN keep `capacity` compiled primitives (a matmul for one shape) instead of its 1024:
    other PyTorch work in the process (the benchmark's transformers peers, whose batches change
    shape every step) evicted the engine's, and compiling them again cost the next W1 run 0.85 s.
    oneDNN reads it when it makes its first primitive; a value already set is kept."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def _pad_tables(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one tensor; short rows repeat their first block (masked out anyway)."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [t[0]] * (width - len(t)) for t in tables], dtype=torch.long)


def _group(members, starts, lengths, first_token, tables, block_size, cache_shape, dtype, device):
    """Attention metadata for the requests selected by the bool mask `members`; `cache_shape` is
    the per-layer cache's `[kv_heads, num_blocks, block_size, head_dim]`, `dtype` the model's."""
    index = members.nonzero().flatten()
    if len(index) == 0:
        return None
    starts, lengths, firsts = starts[index], lengths[index], first_token[index]
    block_tables = _pad_tables([tables[i] for i in index.tolist()])
    max_query_len = int(lengths.max())
    request = torch.repeat_interleave(torch.arange(len(index)), lengths)
    offset = torch.arange(int(lengths.sum())) - (torch.cumsum(lengths, 0) - lengths)[request]
    common = dict(
        token_index=(firsts[request] + offset).to(device),
        query_slot=(request * max_query_len + offset).to(device),
        max_query_len=max_query_len,
        chunks=list(zip(starts.tolist(), lengths.tolist())),
    )
    query_positions = starts[:, None] + torch.arange(max_query_len)[None, :]  # [b, max_q]
    shared = _shared_columns(block_tables)
    visible = torch.arange(block_tables.shape[1] * block_size)[None, None, :] <= query_positions[:, :, None]
    mask = bias = None
    if max_query_len == 1 or shared:  # the matmul paths add the mask to the scores
        bias = additive_mask(visible, cache_shape[0], dtype)
    else:  # the prompt chunks pass it to SDPA
        mask = visible.unsqueeze(1)
    return AttentionGroup(
        **common,
        attn_mask=None if mask is None else mask.to(device),
        attn_bias=None if bias is None else bias.to(device),
        shared_blocks=shared,
        own_rows=cache_rows(block_tables[:, shared:], *cache_shape[:2]).to(device),
        shared_rows=cache_rows(block_tables[:1, :shared], *cache_shape[:2]).to(device) if shared else None,
    )


def _shared_columns(block_tables: torch.Tensor) -> int:
    """Leading columns in which every row holds the same block (a prefix all requests share);
    at most all but the last column, so each row keeps a part of its own."""
    if block_tables.shape[0] < 2:
        return 0
    same = (block_tables == block_tables[0]).all(dim=0)
    return min(int(same.cumprod(dim=0).sum()), block_tables.shape[1] - 1)


class PyTorchModelEngine(ModelEngine):
    def __init__(self, engine_config, config, model_config, checkpoint_dir, plugins):
        if engine_config.num_threads:
            torch.set_num_threads(engine_config.num_threads)
        self.device = resolve_device(model_config.device)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        use_kernels = engine_config.cpu_kernels and self.device.type == "cpu"
        if use_kernels:  # build (or find) the CPU kernels while the weights load
            building = threading.Thread(target=cpu_kernels.load, name="build-cpu-kernels", daemon=True)
            building.start()
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
            keep_onednn_primitives()
        self.hf_config = load_hf_config(checkpoint_dir)
        architectures = getattr(self.hf_config, "architectures", None) or ["LlamaForCausalLM"]
        model_cls = plugins["model"].get(architectures[0]).load()
        with torch.device("meta"):
            model = model_cls(self.hf_config)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.load_weights(iter_weights(checkpoint_dir))
        self.model = model.eval()
        self.cpu_kernels = None  # the C++ kernels, where they apply
        if use_kernels:
            building.join()
            kernels = cpu_kernels.load()
            if kernels is not None and kernels.supports(self.dtype, model.head_dim):
                self.cpu_kernels = kernels
                for module in model.modules():  # the layers that can use them say so
                    if hasattr(type(module), "kernels"):
                        module.kernels = kernels
        if engine_config.pack_weights:  # (after the kernels: they pack too)
            for module in model.modules():
                if isinstance(module, Linear):
                    module.pack()
        self.vocab_size = self.hf_config.vocab_size
        self.max_model_len = model_config.max_model_len or self.hf_config.max_position_embeddings
        if engine_config.cuda_graph_max_batch < 1:
            raise ValueError(f"engine.cuda_graph_max_batch must be >= 1, got {engine_config.cuda_graph_max_batch}")
        self.use_cuda_graphs = engine_config.cuda_graphs and self.device.type == "cuda"
        self.cuda_graph_max_batch = engine_config.cuda_graph_max_batch
        self.decode_graphs: DecodeGraphs | None = None  # made at the first decode step (it needs the caches)
        self.use_cpu_graphs = engine_config.cpu_graphs and self.cpu_kernels is not None
        self.cpu_graphs: CPUDecodeGraphs | None = None  # likewise

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(
            num_layers=len(self.model.layers),
            num_kv_heads=self.model.num_kv_heads,
            head_dim=self.model.head_dim,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
        )

    def prepare_inputs(self, scheduled, kv_cache_manager):
        """Token ids, positions and attention metadata of the packed batch, plus the packed index
        of each sampled request's last token."""
        bs = kv_cache_manager.block_size
        device = self.device
        input_ids: list[int] = []
        starts, lengths, tables, sample_index, sampled, chunk_ranges = [], [], [], [], [], []
        for request in scheduled:
            start, n = request.num_computed_tokens, request.num_scheduled_tokens
            if request.sampling_params.prompt_logprobs is not None and start < request.prompt_len - 1:
                chunk_ranges.append((request, start, len(input_ids), n))
            input_ids.extend(request.tokens(start, start + n))
            starts.append(start)
            lengths.append(n)
            tables.append(kv_cache_manager.get_block_table(request))
            if start + n >= request.num_tokens:  # its last token, then one row per draft to verify
                sample_index.extend(range(len(input_ids) - 1 - (start + n - request.num_tokens), len(input_ids)))
                sampled.append(request)
        starts_t = torch.tensor(starts, dtype=torch.long)
        lengths_t = torch.tensor(lengths, dtype=torch.long)
        request_of_token = torch.repeat_interleave(torch.arange(len(scheduled)), lengths_t)
        first_token = torch.cumsum(lengths_t, 0) - lengths_t
        offset = torch.arange(len(input_ids)) - first_token[request_of_token]  # index within the chunk
        positions = starts_t[request_of_token] + offset
        block_tables = _pad_tables(tables)
        slots = block_tables[request_of_token, positions // bs] * bs + positions % bs
        if self.cpu_kernels is not None:  # one kernel call attends the whole step
            meta = AttentionMetadata(
                slot_mapping=slots,
                decode=None,
                prefill=None,
                cpu_kernels=self.cpu_kernels,
                kernel_tables=KernelTables(
                    block_tables=block_tables.to(torch.int32),
                    query_lens=lengths_t.to(torch.int32),
                    context_lens=(starts_t + lengths_t).to(torch.int32),
                    shared_blocks=_shared_columns(block_tables),
                ),
            )
        else:  # decode rows (one token) and prefill chunks attend separately, so a long chunk in
            # the step does not pad every decode row to its length
            decoding = lengths_t == 1
            common = (starts_t, lengths_t, first_token, tables, bs, kv_cache_manager.get_kv_caches()[0][0].shape, self.dtype, device)
            meta = AttentionMetadata(
                slot_mapping=slots.to(device), decode=_group(decoding, *common), prefill=_group(~decoding, *common)
            )
        return (
            torch.tensor(input_ids, dtype=torch.long, device=device),
            positions.to(device),
            meta,
            torch.tensor(sample_index, dtype=torch.long, device=device),
            sampled,
            chunk_ranges,
        )

    def _graph_step(self, scheduled, kv) -> torch.Tensor | None:
        """Logits of a decode-only step (every request adds its last token and samples) from the
        CUDA graphs; None where the step does not fit them."""
        tables = [kv.get_block_table(r) for r in scheduled]
        if self.decode_graphs is None or self.decode_graphs.kv_caches is not kv.get_kv_caches():
            max_blocks = -(-self.max_model_len // kv.block_size)
            self.decode_graphs = DecodeGraphs(
                self.model, kv.get_kv_caches(), kv.block_size, self.cuda_graph_max_batch, max_blocks,
                capture=self.device.type == "cuda",
            )
        if not self.decode_graphs.covers(len(scheduled), max(len(t) for t in tables)):
            return None
        positions = [r.num_computed_tokens for r in scheduled]
        tokens = [r.tokens(p, p + 1)[0] for r, p in zip(scheduled, positions)]
        return self.decode_graphs.run(tokens, positions, tables)

    def _cpu_graph_step(self, input_ids, positions, meta, kv) -> torch.Tensor:
        """Logits of a decode-only step with the CPU kernels, through the recorded CPU graphs."""
        caches = kv.get_kv_caches()
        if self.cpu_graphs is None or self.cpu_graphs.kv_caches is not caches:
            self.cpu_graphs = CPUDecodeGraphs(self.cpu_kernels, caches)
        tables = meta.kernel_tables
        key = (len(input_ids), tables.block_tables.shape[1], tables.shared_blocks)
        inputs = [input_ids, positions, meta.slot_mapping, tables.block_tables, tables.query_lens, tables.context_lens]
        logits = self.cpu_graphs.run(key, lambda: self.model.compute_logits(self.model(input_ids, positions, meta, caches)), inputs)
        return logits.to(torch.float32, copy=True)  # (the next replay overwrites the graph's output)

    @torch.inference_mode()
    def forward(self, scheduled, resource_manager):
        kv = resource_manager.kv_cache_manager
        decode_only = (self.use_cuda_graphs or self.use_cpu_graphs) and all(
            r.num_scheduled_tokens == 1 and r.num_computed_tokens + 1 == r.num_tokens for r in scheduled
        )
        if self.use_cuda_graphs and decode_only:
            logits = self._graph_step(scheduled, kv)
            if logits is not None:
                return ForwardOutput(logits=logits, sampled=list(scheduled), prompt_logits=[])
        input_ids, positions, meta, sample_index, sampled, chunk_ranges = self.prepare_inputs(scheduled, kv)
        if self.use_cpu_graphs and decode_only:
            return ForwardOutput(logits=self._cpu_graph_step(input_ids, positions, meta, kv), sampled=sampled, prompt_logits=[])
        hidden = self.model(input_ids, positions, meta, kv.get_kv_caches())
        logits = self.model.compute_logits(hidden[sample_index]).float()
        prompt_logits = [
            (request, start, self.model.compute_logits(hidden[offset : offset + n]).float())
            for request, start, offset, n in chunk_ranges
        ]
        return ForwardOutput(logits=logits, sampled=sampled, prompt_logits=prompt_logits)
