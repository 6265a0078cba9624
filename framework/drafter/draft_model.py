"""A smaller model of the same tokenizer runs ahead `num_tokens` steps for the decoding requests."""

from __future__ import annotations

import torch

from framework.config import KVCacheConfig
from framework.decoder.base import argmax
from framework.decoder.sampling import draw
from framework.drafter.base import DraftContext, Drafter
from framework.drafter.config import DraftModelConfig
from framework.drafter.draft_cache import DraftCache
from framework.request import LlmRequest
from framework.resources.paged_kv_cache import PagedKVCacheManager

_DRAFT_SEED = 0x5EED_D4AF7  # mixed into seeds: a draft never shares the decoder's random stream


class DraftModelDrafter(Drafter):
    """Each step, one batched forward of the draft model catches each decoding request's mirror up
    (the tokens it has not computed: normally the last verified ones) and yields its first draft,
    then `num_tokens - 1` decode steps yield the rest. A greedy request gets the draft's argmax; a
    sampled one a draw from the draft's distribution q (its temperature, top-k, top-p and min-p
    applied to the draft's logits), with q handed on in `draft_probs` for the accept/resample rule.
    The draft's KV cache is a `DraftCache` in the executor's container (`request_states`)."""

    def __init__(self, speculative_config, config: DraftModelConfig | None = None, context: DraftContext | None = None):
        super().__init__(speculative_config, config or DraftModelConfig(), context)
        path = self.config.model.path
        if not path:
            raise ValueError("speculative=draft_model needs the draft's checkpoint: speculative.model.path=<folder or .gguf>")
        if context is None:
            raise ValueError("the draft_model drafter is built with a DraftContext (the target engine and how to load another)")
        self.engine = context.load_engine(path)
        target = context.target
        if self.engine.vocab_size != target.vocab_size:
            raise ValueError(
                f"the draft model {path!r} has a vocabulary of {self.engine.vocab_size} tokens and the target "
                f"{target.vocab_size}: a draft model must share the target's tokenizer"
            )
        if self.engine.max_model_len < target.max_model_len:
            raise ValueError(
                f"the draft model {path!r} handles {self.engine.max_model_len} positions and the target "
                f"{target.max_model_len}: set model.max_model_len <= {self.engine.max_model_len}"
            )
        self.max_model_len = target.max_model_len
        kv = context.kv_cache
        tokens = PagedKVCacheManager.pool_blocks(kv, target.kv_cache_spec()) * kv.block_size  # as many as the target's pool
        draft_kv = KVCacheConfig(block_size=kv.block_size, max_tokens=tokens, enable_prefix_caching=kv.enable_prefix_caching)
        self.request_states = DraftCache(PagedKVCacheManager(draft_kv, None, self.engine.kv_cache_spec()))
        self.seed = context.seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def propose(self, requests):
        if not self.num_tokens or not requests or len(requests) > self.max_batch_size:
            return
        planned = self._with_room(requests)
        if not planned:
            return
        probs: dict[int, list] = {id(r): [] for r, _, _ in planned}
        with torch.inference_mode():
            for step in range(max(k for _, _, k in planned)):
                running = [(r, m) for r, m, k in planned if step < k]
                logits = self._forward([m for _, m in running], commit=step == 0)
                tokens, rows = self._draw([r for r, _ in running], logits)
                for (request, mirror), token, row in zip(running, tokens, rows):
                    mirror.output_token_ids.append(token)
                    request.draft_token_ids.append(token)
                    probs[id(request)].append(row)
        for request, _, _ in planned:
            if request.sampling_params.temperature > 0:
                request.draft_probs = torch.stack(probs[id(request)])

    def _with_room(self, requests: list[LlmRequest]) -> list[tuple[LlmRequest, LlmRequest, int]]:
        """(request, its synced mirror, drafts to propose) for each request that may still produce
        more than one token and whose mirror's blocks for this step fit in the draft pool."""
        cache = self.request_states
        free = cache.kv_cache.num_free_blocks
        planned = []
        for request in requests:
            k = min(self.num_tokens, request.draft_room(self.max_model_len))
            if k <= 0:
                continue
            mirror = cache.sync(request)
            need = cache.kv_cache.blocks_needed(mirror, mirror.num_tokens - mirror.num_computed_tokens + k - 1)
            if need <= free:
                free -= need
                request.draft_token_ids = []
                planned.append((request, mirror, k))
        return planned

    def _forward(self, mirrors: list[LlmRequest], commit: bool):
        """The draft model's logits after each mirror's last token, its missing tokens computed.
        With `commit`, the mirrors hold only the request's own tokens: their full blocks are keyed
        for prefix reuse (blocks holding drafts never are)."""
        kv = self.request_states.kv_cache
        try:
            for mirror in mirrors:
                mirror.num_scheduled_tokens = mirror.num_tokens - mirror.num_computed_tokens
            kv.prepare_resources(mirrors)
            output = self.engine.forward(mirrors, self.request_states.resources)
            for mirror in mirrors:
                mirror.num_computed_tokens += mirror.num_scheduled_tokens
        finally:
            for mirror in mirrors:
                mirror.num_scheduled_tokens = 0
        if commit:
            kv.update_resources(mirrors)
        return output.logits

    def _draw(self, requests: list[LlmRequest], logits) -> tuple[list[int], list]:
        """Per request: its draft token and the distribution it was drawn from (None: the argmax)."""
        tokens, probs, _ = draw(requests, logits, lambda rows: argmax(rows, self.engine.backend), self._shared_generator, self._request_generator)
        if probs is None:
            return tokens.tolist(), [None] * len(requests)
        return tokens.tolist(), [None if r.sampling_params.temperature == 0 else row for r, row in zip(requests, probs)]

    def _shared_generator(self, device) -> torch.Generator:
        if device not in self._shared:
            self._shared[device] = torch.Generator(device=device).manual_seed(self.seed ^ _DRAFT_SEED)
        return self._shared[device]

    def _request_generator(self, request: LlmRequest, device) -> torch.Generator:
        generators = self.request_states.generators
        if request.request_id not in generators:
            generators[request.request_id] = torch.Generator(device=device).manual_seed(request.sampling_params.seed ^ _DRAFT_SEED)
        return generators[request.request_id]
