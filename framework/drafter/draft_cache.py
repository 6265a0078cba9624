"""The draft model's KV cache, as a resource manager in the executor's container.

The draft model computes over a *mirror* of each request: an LlmRequest of its own with the same
prompt, the request's outputs copied in as they come, then the drafts it runs ahead with, and a
cursor of its own (`num_computed_tokens`: how much of that the draft's cache holds). The cache is
a PagedKVCacheManager over the draft model's KV spec, driven with the mirrors, so it reuses
prefixes, grows block by block and never keys a block that holds a draft.
"""

from __future__ import annotations

from dataclasses import dataclass

from framework.request import LlmRequest, RequestState
from framework.resources.base import BaseResourceManager, ResourceManager
from framework.resources.paged_kv_cache import PagedKVCacheManager
from framework.sampling_params import SamplingParams


@dataclass
class Mirror:
    sequence: LlmRequest  # the draft model's view of the request: its tokens, then the drafts it proposed
    synced: int = 0  # how many of the request's output tokens `sequence` holds (its drafts follow them)


class DraftCache(BaseResourceManager):
    """Mirrors of the running requests and the draft model's paged cache over them. Drafting is
    best effort: a request the pool has no room for gets no drafts that step, so the draft cache
    never holds a request back (`can_admit` stays True). A preempted request loses its mirror and
    blocks (the draft recomputes it, mostly from its prefix cache); its generator, like the
    decoder's, lasts until the request finishes."""

    def __init__(self, kv_cache: PagedKVCacheManager):
        self.kv_cache = kv_cache
        self.resources = ResourceManager({"kv_cache": kv_cache})  # what the draft engine's forward takes
        self.mirrors: dict[str, Mirror] = {}
        self.generators: dict[str, object] = {}  # request id -> torch.Generator of a seeded request's drafts

    def __len__(self) -> int:
        """Requests it holds anything for."""
        return len(self.mirrors.keys() | self.generators.keys())

    def sync(self, request: LlmRequest) -> LlmRequest:
        """The request's mirror with its new output tokens, the cursor moved back to the last
        token that the draft computed and the request kept (drafts it rejected are recomputed);
        made and admitted (cached prefix attached) the first time."""
        mirror = self.mirrors.get(request.request_id)
        if mirror is None:
            sequence = LlmRequest(
                request.request_id, request.prompt_token_ids, SamplingParams(max_tokens=request.sampling_params.max_tokens),
                output_token_ids=list(request.output_token_ids), state=RequestState.GENERATION,
            )
            self.mirrors[request.request_id] = Mirror(sequence, len(request.output_token_ids))
            self.kv_cache.admit(sequence)
            return sequence
        sequence, synced = mirror.sequence, mirror.synced
        drafted = sequence.output_token_ids[synced:]
        del sequence.output_token_ids[synced:]
        new = request.output_token_ids[synced:]
        kept = next((i for i, (a, b) in enumerate(zip(drafted, new)) if a != b), min(len(drafted), len(new)))
        sequence.output_token_ids += new
        mirror.synced = len(request.output_token_ids)
        sequence.num_computed_tokens = min(sequence.num_computed_tokens, request.num_tokens - len(new) + kept, sequence.num_tokens - 1)
        return sequence

    # ---- the resource-manager protocol -------------------------------------------------------
    def prepare_resources(self, scheduled) -> None:
        pass  # the drafter grows its mirrors' tables itself, before it runs the draft model

    def update_resources(self, scheduled) -> None:
        pass

    def reset_prefix_cache(self) -> int:
        return self.kv_cache.reset_prefix_cache()

    def free_resources(self, request: LlmRequest) -> None:
        mirror = self.mirrors.pop(request.request_id, None)
        if mirror is not None:
            self.kv_cache.free_resources(mirror.sequence)
        if request.is_finished:
            self.generators.pop(request.request_id, None)

    def get_max_resource_count(self) -> int:
        return self.kv_cache.get_max_resource_count()

    def get_needed_resource_to_completion(self, request) -> int:
        return 0  # nothing is reserved: a request without room in the draft pool is only not drafted
