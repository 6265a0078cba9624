"""The built-in model engine: packs a step's tokens into one ragged batch, has the backend build the
attention metadata from the block tables, and runs the model (decode-only steps through the
backend's graphs where it has them).

With `engine.tensor_parallel_size=N > 1` the engine is rank 0 of N (docs/tensor-parallel.md): it
sends each packed step to the other ranks, which run the same forward on their shards
(`framework/distributed/`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import weakref

import torch

from framework.backend.choice import choose_backend
from framework.distributed.step_message import StepInputs
from framework.engine.base import ForwardOutput, ModelEngine
from framework.engine.dtype import choose_dtype
from framework.layers.linear import Linear
from framework.layers.tensor_parallel import WHOLE, building
from framework.models.checkpoint import every_layer_window, head_dim_of, iter_weights, load_hf_config
from framework.plugins.kinds import KINDS
from framework.resources.base import KVCacheSpec

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


logger = logging.getLogger(__name__)


class PyTorchModelEngine(ModelEngine):
    def __init__(self, engine_config, config, model_config, checkpoint_dir, plugins):
        if engine_config.num_threads:
            torch.set_num_threads(engine_config.num_threads)
        self.device = resolve_device(model_config.device)
        self.ranks = self._join_ranks(engine_config, model_config, checkpoint_dir, plugins)
        tp = WHOLE if self.ranks is None else self.ranks.tp
        self.hf_config = load_hf_config(checkpoint_dir)
        self.dtype, why = choose_dtype(model_config.dtype, self.device, self.hf_config)
        logger.info("dtype %s (%s)", str(self.dtype).removeprefix("torch."), why)
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
            keep_onednn_primitives()
        architectures = getattr(self.hf_config, "architectures", None) or ["LlamaForCausalLM"]
        entry = plugins["model"].get(architectures[0])
        model_cls = entry.load()
        self.backend = choose_backend(
            engine_config, plugins["backend"], self.device, self.dtype, head_dim_of(self.hf_config),
            getattr(model_cls, "attention_variants", lambda config: frozenset())(self.hf_config),  # (not a CausalLM: refused below)
        )
        with torch.device("meta"), building(tp):
            model = KINDS["model"].checked(model_cls(self.hf_config, self.backend), entry)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.load_weights(iter_weights(checkpoint_dir))
        self.model = model.eval()
        if engine_config.pack_weights:
            for module in model.modules():
                if isinstance(module, Linear):
                    module.pack()
        if self.ranks is not None:
            self.ranks.ready()
        self.vocab_size = self.hf_config.vocab_size
        self.max_model_len = model_config.max_model_len or self.hf_config.max_position_embeddings
        self._graphs = (None, None)  # (the KV caches, the backend's decode graphs over them), made at the first decode step
        self._own_caches = (None, None)  # (shape, caches) of a rank other than 0

    def _join_ranks(self, engine_config, model_config, checkpoint_dir, plugins):
        """The tensor-parallel process group (None: one process, no torch.distributed)."""
        size = getattr(engine_config, "tensor_parallel_size", 1)
        if size == 1:
            return None
        if size < 1:
            raise ValueError(f"engine.tensor_parallel_size must be >= 1, got {size}")
        import torch.distributed as dist

        from framework.distributed.group import RankGroup, plain

        if dist.is_initialized():
            raise ValueError("one tensor-parallel engine per process")
        settings = {
            "engine": plain(engine_config), "model": plain(model_config), "checkpoint_dir": str(checkpoint_dir), "plugins": plugins.recipe(),
        }
        ranks = RankGroup(size, self.device, engine_config.distributed_timeout, settings)
        self.device = ranks.device
        self._stop_ranks = weakref.finalize(self, ranks.close)
        return ranks

    def close(self) -> None:
        if self.ranks is not None:
            self._stop_ranks()

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(
            num_layers=self.model.num_layers,
            num_kv_heads=self.model.num_kv_heads,
            head_dim=self.model.head_dim,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
            allocate=self.backend.kv_cache_tensor,
            sliding_window=every_layer_window(self.hf_config),
        )

    def prepare_inputs(self, scheduled, kv_cache_manager):
        """Token ids, positions and attention metadata of the packed batch, plus the packed index
        of each sampled request's last token."""
        step, sampled, chunk_ranges = pack_step(scheduled, kv_cache_manager)
        cache_shape = kv_cache_manager.get_kv_caches()[0][0].shape
        meta = self.backend.attention_metadata(step.positions, step.tables, step.query_lens, step.context_lens, cache_shape)
        return step.input_ids.to(self.device), step.positions.to(self.device), meta, step.rows.to(self.device), sampled, chunk_ranges

    def _graph_logits(self, caches, block_size: int, tokens, positions, tables, query_len: int) -> torch.Tensor | None:
        """Logits of a decode-only step (see `DecodeGraphs.run`) from the backend's graphs over
        `caches`; None where it has none or they do not cover the step."""
        if self._graphs[0] is not caches:
            self._graphs = (caches, self.backend.decode_graphs(self.model, caches, block_size, self.max_model_len))
        graphs = self._graphs[1]
        if graphs is None or not graphs.covers(len(tables), max(len(t) for t in tables), query_len):
            return None
        return graphs.run(tokens, positions, tables, query_len)

    def _graph_step(self, scheduled, kv, query_len: int) -> torch.Tensor | None:
        """`_graph_logits` of the decode-only step of `scheduled`."""
        positions = [r.num_computed_tokens for r in scheduled]
        tokens = [token for r, p in zip(scheduled, positions) for token in r.tokens(p, p + query_len)]
        tables = [kv.get_block_table(r) for r in scheduled]
        return self._graph_logits(kv.get_kv_caches(), kv.block_size, tokens, positions, tables, query_len)

    @torch.inference_mode()
    def forward(self, scheduled, resource_manager):
        kv = resource_manager.kv_cache_manager
        if self.ranks is not None:
            return self._forward_tensor_parallel(scheduled, kv)
        query_len = decode_query_len(scheduled)
        if query_len is not None:
            logits = self._graph_step(scheduled, kv, query_len)
            if logits is not None:
                return ForwardOutput(logits=logits, sampled=list(scheduled), prompt_logits=[])
        input_ids, positions, meta, sample_index, sampled, chunk_ranges = self.prepare_inputs(scheduled, kv)
        hidden = self.model(input_ids, positions, meta, kv.get_kv_caches())
        logits = self.model.compute_logits(hidden[sample_index]).float()
        prompt_logits = [
            (request, start, self.model.compute_logits(hidden[offset : offset + n]).float())
            for request, start, offset, n in chunk_ranges
        ]
        return ForwardOutput(logits=logits, sampled=sampled, prompt_logits=prompt_logits)

    def _forward_tensor_parallel(self, scheduled, kv) -> ForwardOutput:
        """Rank 0's step: send the packed step, then run its own share; the sampled rows' logits and
        each prompt-logprob chunk's come from one gather."""
        step, sampled, chunk_ranges = pack_step(scheduled, kv)
        step.decode = decode_query_len(scheduled) is not None  # (then every packed token is a row)
        sample_index = step.rows
        step.rows = torch.cat([sample_index, *(torch.arange(offset, offset + n) for _, _, offset, n in chunk_ranges)])

        def run():
            self.ranks.send(step)
            return self.forward_rows(step, kv.get_kv_caches())

        rows = self.ranks.guard(run).split([len(sample_index), *(n for *_, n in chunk_ranges)])
        prompt_logits = [(request, start, logits) for (request, start, _, _), logits in zip(chunk_ranges, rows[1:])]
        return ForwardOutput(logits=rows[0], sampled=sampled, prompt_logits=prompt_logits)

    @torch.inference_mode()
    def forward_rows(self, step: StepInputs, kv_caches=None) -> torch.Tensor:
        """Every rank's forward of a packed step: float32 logits of `step.rows` (rank 0: over the
        whole vocabulary; the other ranks: their shard), a decode step from the backend's graphs
        where it has them. `kv_caches`: the KV cache manager's on rank 0; the other ranks keep
        their own, as large as rank 0's pool."""
        if kv_caches is None:
            kv_caches = self._rank_caches(step.cache_blocks, step.block_size)
        if step.decode:  # (every rank gets the same step, so computes the same graph key)
            starts = (step.context_lens - step.query_lens).tolist()
            query_len = int(step.query_lens[0])
            logits = self._graph_logits(kv_caches, step.block_size, step.input_ids.tolist(), starts, step.tables, query_len)
            if logits is not None:
                return logits
        meta = self.backend.attention_metadata(step.positions, step.tables, step.query_lens, step.context_lens, kv_caches[0][0].shape)
        hidden = self.model(step.input_ids.to(self.device), step.positions.to(self.device), meta, kv_caches)
        return self.model.compute_logits(hidden[step.rows.to(self.device)]).float()

    def _rank_caches(self, num_blocks: int, block_size: int):
        shape = (self.model.num_kv_heads, num_blocks, block_size, self.model.head_dim)
        if self._own_caches[0] != shape:
            caches = [(self.backend.kv_cache_tensor(shape), self.backend.kv_cache_tensor(shape)) for _ in range(self.model.num_layers)]
            self._own_caches = (shape, caches)
        return self._own_caches[1]


def decode_query_len(scheduled) -> int | None:
    """The tokens each request adds in a decode-only step (its last token and the same number of
    drafts to verify, all sampled); None for any other step."""
    query_len = scheduled[0].num_scheduled_tokens
    if all(r.num_scheduled_tokens == query_len == 1 + len(r.draft_token_ids) and r.num_computed_tokens + 1 == r.num_tokens for r in scheduled):
        return query_len
    return None


def pack_step(scheduled, kv_cache_manager):
    """The packed step of `scheduled` (CPU tensors; its `rows` are the packed index of each sampled
    request's last token and of each draft it verifies), the sampled requests, and `(request, first
    position, packed offset, tokens)` of each chunk whose prompt logprobs are asked."""
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
    _, num_blocks, block_size, _ = kv_cache_manager.get_kv_caches()[0][0].shape
    step = StepInputs(
        torch.tensor(input_ids, dtype=torch.long), positions, tables, lengths_t, starts_t + lengths_t,
        torch.tensor(sample_index, dtype=torch.long), num_blocks, block_size,
    )
    return step, sampled, chunk_ranges
