"""DraftCache: how a request's mirror follows it (its cursor moved back over rejected drafts) and
what it holds in the draft pool, on a tiny paged cache of 16 blocks of 4 tokens."""

from __future__ import annotations

import pytest

from framework.drafter.draft_cache import DraftCache
from framework.request import LlmRequest, RequestState
from framework.sampling_params import SamplingParams
from framework.testing import tiny_kv_cache


def decoding(prompt_len=10) -> LlmRequest:
    request = LlmRequest("a", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=50), state=RequestState.GENERATION)
    request.output_token_ids = [100]
    return request


def ran_ahead(cache: DraftCache, request: LlmRequest, drafts: list[int]):
    """As the drafter leaves a mirror: its tokens computed, `drafts` appended, all but the last fed."""
    mirror = cache.sync(request)
    mirror.num_scheduled_tokens = mirror.num_tokens - mirror.num_computed_tokens + len(drafts) - 1
    cache.kv_cache.prepare_resources([mirror])
    mirror.num_scheduled_tokens = 0
    mirror.num_computed_tokens = mirror.num_tokens
    cache.kv_cache.update_resources([mirror])
    mirror.output_token_ids += drafts
    mirror.num_computed_tokens += len(drafts) - 1
    return mirror


@pytest.mark.parametrize(
    "appended, cursor",
    [
        ([20, 30], 12),  # one draft accepted, then the target's own token: the draft's K/V of 20 is kept
        ([20, 21, 22, 40], 13),  # all accepted plus the bonus: everything fed is kept (22 was never fed)
        ([30], 11),  # the first draft rejected: back to the request's last token before the drafts
        ([], 10),  # not run this step: the last token is computed again (its logits were not kept)
    ],
)
def test_sync_moves_the_cursor_back_over_rejected_drafts(appended, cursor):
    cache = DraftCache(tiny_kv_cache())
    request = decoding()
    mirror = ran_ahead(cache, request, [20, 21, 22])
    assert mirror.num_computed_tokens == 13
    request.output_token_ids += appended
    assert cache.sync(request) is mirror
    assert mirror.output_token_ids == request.output_token_ids and mirror.num_computed_tokens == cursor


def test_blocks_holding_drafts_are_never_keyed():
    cache = DraftCache(tiny_kv_cache())
    request = decoding(prompt_len=7)  # 8 tokens: two full blocks, then drafts fill a third
    mirror = ran_ahead(cache, request, [20, 21, 22, 23, 24])
    kv = cache.kv_cache
    assert mirror.num_computed_tokens == 12 and len(kv.get_block_table(mirror)) == 3
    assert len(kv.pool.cached) == 2 and len(kv.block_hashes["a"]) == 2


def test_a_new_mirror_takes_the_cached_prefix():
    cache = DraftCache(tiny_kv_cache())
    ran_ahead(cache, decoding(), [20])
    first = cache.mirrors["a"].sequence
    other = decoding()
    other.request_id = "b"
    assert cache.sync(other).num_computed_tokens == 8  # two full blocks of the shared 11 tokens
    assert cache.kv_cache.get_block_table(cache.mirrors["b"].sequence)[:2] == cache.kv_cache.get_block_table(first)[:2]


def test_preemption_frees_the_mirror_and_keeps_the_generator_until_the_end():
    cache = DraftCache(tiny_kv_cache())
    request = decoding()
    ran_ahead(cache, request, [20, 21])
    cache.generators["a"] = object()
    request.state = RequestState.QUEUED  # preempted
    cache.free_resources(request)
    assert "a" not in cache.mirrors and "a" in cache.generators and len(cache) == 1
    assert cache.kv_cache.stats().num_used_blocks == 0
    request.state = RequestState.FINISHED
    cache.free_resources(request)
    assert len(cache) == 0
