"""Capacity policies (guaranteed_no_evict, max_utilization, static_batch) and micro-batch policies
(fcfs, equal_progress): what fits, what is chunked, what is preempted, in which order.

Single-step decisions use `FakeKV`, a KVCacheCapacity with explicit numbers; multi-step scenarios
use a real PagedKVCacheManager (block_size=4) driven by the conftest's MiniExecutor."""

from __future__ import annotations

import types
from collections import deque

import pytest

from framework.request import LlmRequest, RequestState
from framework.sampling_params import SamplingParams
from framework.scheduler.capacity import GuaranteedNoEvictScheduler, MaxUtilizationScheduler, StaticBatchScheduler
from framework.scheduler.micro_batch import EqualProgressMicroBatchScheduler, FCFSMicroBatchScheduler

BS = 4  # block size of every KV view below


def _ceil_div(a, b):
    return -(-a // b)


class FakeKV:
    """KVCacheCapacity with explicit numbers: `free` blocks, blocks `held` per request id,
    `exclusive` blocks per request id (default: all it holds) and, for a request not admitted yet
    (no `held` entry), its prefix `hits` per request id as (reusable blocks, of which unreferenced).
    The queries follow PagedKVCacheManager's formulas."""

    block_size = BS

    def __init__(self, free, total=64, held=None, exclusive=None, hits=None):
        self.free = free
        self.total = total
        self.held = dict(held or {})
        self.exclusive = dict(exclusive or {})
        self.hits = dict(hits or {})

    @property
    def num_free_blocks(self):
        return self.free

    def _hits(self, request):
        if request.request_id in self.held:
            return None
        return self.hits.get(request.request_id, (0, 0))

    def blocks_needed(self, request, num_new_tokens):
        hits = self._hits(request)
        if hits is not None:
            return hits[1] + _ceil_div(num_new_tokens, BS)
        end = request.num_computed_tokens + num_new_tokens
        return max(0, _ceil_div(end, BS) - self.held[request.request_id])

    def get_needed_resource_to_completion(self, request):
        total = _ceil_div(request.max_total_tokens - 1, BS)
        hits = self._hits(request)
        if hits is not None:
            reusable, unreferenced = hits
            return unreferenced + total - reusable
        return max(0, total - self.held[request.request_id])

    def num_exclusive_blocks(self, request):
        return self.exclusive.get(request.request_id, self.held.get(request.request_id, 0))

    def get_max_resource_count(self):
        return self.total


def cfg(max_batch_size=8, max_num_tokens=64):
    return types.SimpleNamespace(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens)


def req(rid, prompt_len, max_tokens=8, *, computed=0, outputs=0, state=None, first_token=1):
    """A request with `prompt_len` prompt tokens, `outputs` generated tokens and `computed` tokens
    in the cache; QUEUED if nothing is computed, else CONTEXT or GENERATION as its tokens say."""
    r = LlmRequest(
        request_id=rid,
        prompt_token_ids=list(range(first_token, first_token + prompt_len)),
        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    r.output_token_ids = [500 + i for i in range(outputs)]
    r.num_computed_tokens = computed
    if state is None:
        state = RequestState.GENERATION if outputs else (RequestState.CONTEXT if computed else RequestState.QUEUED)
    r.state = state
    return r


def decoding(rid, prompt_len=8, max_tokens=8):
    """Running, one token to compute (its last sampled one)."""
    return req(rid, prompt_len, max_tokens, computed=prompt_len, outputs=1)


def ids(requests):
    return [r.request_id for r in requests]


def chunks(plan):
    return [(chunk.request.request_id, chunk.num_tokens) for chunk in plan]


CAPACITY = {
    "guaranteed_no_evict": GuaranteedNoEvictScheduler,
    "max_utilization": MaxUtilizationScheduler,
    "static_batch": StaticBatchScheduler,
}
MICRO_BATCH = {"fcfs": FCFSMicroBatchScheduler, "equal_progress": EqualProgressMicroBatchScheduler}


# ---- guaranteed_no_evict -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "free, expected",
    [
        (2, []),
        (3, ["a"]),
        (8, ["a", "b"]),  # c needs 3, 2 are left: c and d (which would fit) wait
        (9, ["a", "b", "c"]),
        (10, ["a", "b", "c", "d"]),
    ],
)
def test_guaranteed_no_evict_reserves_to_completion_in_arrival_order(free, expected):
    a, b, c = (req(x, 8, max_tokens=5) for x in "abc")  # 12 tokens cached at most: 3 blocks
    d = req("d", 2, max_tokens=2)  # 1 block
    out = GuaranteedNoEvictScheduler(cfg(), None).schedule([a, b, c, d], FakeKV(free))
    assert ids(out.fitting) == expected
    assert out.preempted == []


def test_guaranteed_no_evict_sets_aside_running_requests_remaining_needs():
    r = req("r", 8, max_tokens=5, computed=8, outputs=1)  # needs 3 blocks in all, holds 2
    q = req("q", 8, max_tokens=5)  # 3 blocks
    q2 = req("q2", 2, max_tokens=2)  # 1 block
    scheduler = GuaranteedNoEvictScheduler(cfg(), None)
    out = scheduler.schedule([r, q, q2], FakeKV(4, held={"r": 2}))
    assert ids(out.fitting) == ["r", "q"]  # 4 free - 1 reserved for r = 3: q only
    out = scheduler.schedule([r, q, q2], FakeKV(4, held={"r": 3}))
    assert ids(out.fitting) == ["r", "q", "q2"]  # r needs nothing more


@pytest.mark.parametrize(
    "hits, free, expected",
    [
        ({}, 7, ["a", "b"]),  # 3 blocks each
        ({"b": (2, 0), "c": (2, 0)}, 5, ["a", "b", "c"]),  # 2 of 3 blocks held by others: 1 each
        ({"b": (2, 2), "c": (2, 2)}, 5, ["a"]),  # the same blocks unreferenced: 3 each
        ({"b": (2, 1), "c": (2, 0)}, 6, ["a", "b", "c"]),  # 3 + 2 + 1
        ({"b": (2, 1), "c": (2, 0)}, 5, ["a", "b"]),
    ],
)
def test_guaranteed_no_evict_charges_unreferenced_hits_and_not_referenced_ones(hits, free, expected):
    a, b, c = (req(x, 8, max_tokens=5) for x in "abc")  # 12 tokens cached at most: 3 blocks
    out = GuaranteedNoEvictScheduler(cfg(), None).schedule([a, b, c], FakeKV(free, hits=hits))
    assert ids(out.fitting) == expected
    assert out.preempted == []


def test_guaranteed_no_evict_admits_more_requests_sharing_a_cached_prefix(h):
    """r runs and holds the 8-token prefix; q1..q3 extend it by one token. Each needs 3 blocks to
    completion, 2 of them r's: with prefix caching each costs 1 block, so all three are admitted
    at once; without, one at a time as blocks are freed."""
    conf = cfg(max_batch_size=8, max_num_tokens=64)
    runs = {}
    for caching in (True, False):
        kv = h.kv(max_tokens=32, enable_prefix_caching=caching)
        r = h.request("r", list(range(1, 9)), max_tokens=5)  # 3 blocks to completion
        qs = [h.request(f"q{i}", list(range(1, 9)) + [90 + i], max_tokens=4) for i in (1, 2, 3)]
        sim = h.MiniExecutor(GuaranteedNoEvictScheduler(conf, None), FCFSMicroBatchScheduler(conf, None), kv)
        sim.add(r)
        sim.step()
        assert kv.get_block_table(r) == [0, 1]
        assert kv.num_free_blocks == 6
        assert [kv.get_needed_resource_to_completion(q) for q in qs] == ([1, 1, 1] if caching else [3, 3, 3])
        sim.add(*qs)
        runs[caching] = [(rec.fitting, rec.admitted, rec.chunks) for rec in sim.run()]
        assert all(rec.preempted == [] for rec in sim.records)
        assert [len(x.output_token_ids) for x in (r, *qs)] == [5, 4, 4, 4]
        assert kv.stats().prefix_hit_tokens == (24 if caching else 0)
        h.assert_pool_idle(kv)
    everyone = ["r", "q1", "q2", "q3"]
    assert runs[True] == [
        (["r"], {"r": 0}, {"r": 8}),
        (everyone, {"q1": 8, "q2": 8, "q3": 8}, {"r": 1, "q1": 1, "q2": 1, "q3": 1}),
        *[(everyone, {}, {"r": 1, "q1": 1, "q2": 1, "q3": 1})] * 3,
    ]
    assert runs[False] == [
        (["r"], {"r": 0}, {"r": 8}),
        (["r", "q1"], {"q1": 0}, {"r": 1, "q1": 9}),
        *[(["r", "q1"], {}, {"r": 1, "q1": 1})] * 3,
        (["q2", "q3"], {"q2": 0, "q3": 0}, {"q2": 9, "q3": 9}),
        *[(["q2", "q3"], {}, {"q2": 1, "q3": 1})] * 3,
    ]


def test_guaranteed_no_evict_keeps_running_requests_first_and_caps_admissions_by_batch_size():
    q1, r1, q2, q3 = req("q1", 4), decoding("r1"), req("q2", 4), req("q3", 4)
    out = GuaranteedNoEvictScheduler(cfg(max_batch_size=2), None).schedule([q1, r1, q2, q3], FakeKV(100))
    assert ids(out.fitting) == ["r1", "q1"]
    out = GuaranteedNoEvictScheduler(cfg(max_batch_size=1), None).schedule([q1, r1, q2, q3], FakeKV(100))
    assert ids(out.fitting) == ["r1"]


def test_guaranteed_no_evict_never_preempts():
    r1, r2, q = decoding("r1", max_tokens=20), decoding("r2", max_tokens=20), req("q", 2)
    out = GuaranteedNoEvictScheduler(cfg(), None).schedule([r1, r2, q], FakeKV(0, held={"r1": 2, "r2": 2}))
    assert ids(out.fitting) == ["r1", "r2"]
    assert out.preempted == []


# ---- static_batch --------------------------------------------------------------------------------
def test_static_batch_admits_nothing_while_a_batch_runs():
    r, q = decoding("r"), req("q", 4)
    out = StaticBatchScheduler(cfg(), None).schedule([q, r], FakeKV(100))
    assert ids(out.fitting) == ["r"]
    assert out.preempted == []


def test_static_batch_admits_a_new_batch_like_guaranteed_no_evict():
    qs = [req(f"q{i}", 8, max_tokens=5) for i in range(4)]  # 3 blocks each
    assert ids(StaticBatchScheduler(cfg(), None).schedule(qs, FakeKV(7)).fitting) == ["q0", "q1"]
    assert ids(StaticBatchScheduler(cfg(max_batch_size=3), None).schedule(qs, FakeKV(100)).fitting) == [
        "q0", "q1", "q2",
    ]


@pytest.mark.parametrize(
    "policy, fittings, step3_chunks",
    [
        ("static_batch", [["a", "b"], ["a", "b"], ["b"], ["b"], ["c"]], {"b": 1}),
        ("guaranteed_no_evict", [["a", "b"], ["a", "b"], ["b", "c"], ["b"]], {"b": 1, "c": 4}),
    ],
)
def test_static_batch_waits_for_the_whole_batch_to_finish(h, policy, fittings, step3_chunks):
    kv = h.kv(max_tokens=32)
    a = h.request("a", [1, 2, 3, 4], max_tokens=2)
    b = h.request("b", [11, 12, 13, 14], max_tokens=4)
    c = h.request("c", [21, 22, 23, 24], max_tokens=1)
    sim = h.MiniExecutor(CAPACITY[policy](cfg(max_batch_size=2, max_num_tokens=16), None),
                         FCFSMicroBatchScheduler(cfg(max_batch_size=2, max_num_tokens=16), None), kv)
    sim.add(a, b, c)
    records = sim.run()
    assert [r.fitting for r in records] == fittings
    assert records[2].chunks == step3_chunks
    assert [len(r.output_token_ids) for r in (a, b, c)] == [2, 4, 1]
    h.assert_pool_idle(kv)


# ---- max_utilization -----------------------------------------------------------------------------
def test_max_utilization_admits_on_next_step_blocks_only():
    qs = [req(f"q{i}", 8, max_tokens=20) for i in range(3)]  # next step 2 blocks; 7 to completion
    mu = MaxUtilizationScheduler(cfg(max_num_tokens=8), None)
    out = mu.schedule(qs, FakeKV(4))
    assert ids(out.fitting) == ["q0", "q1"]
    assert out.preempted == []
    assert GuaranteedNoEvictScheduler(cfg(max_num_tokens=8), None).schedule(qs, FakeKV(4)).fitting == []


def test_max_utilization_next_step_is_capped_by_the_token_budget():
    q = req("q", 20)  # 5 blocks for the whole prompt, 2 for a chunk of 8
    assert ids(MaxUtilizationScheduler(cfg(max_num_tokens=8), None).schedule([q], FakeKV(2)).fitting) == ["q"]
    assert MaxUtilizationScheduler(cfg(max_num_tokens=8), None).schedule([q], FakeKV(1)).fitting == []
    assert MaxUtilizationScheduler(cfg(max_num_tokens=64), None).schedule([q], FakeKV(4)).fitting == []


def test_max_utilization_admits_in_arrival_order_up_to_the_batch_size():
    q1, q2 = req("q1", 12), req("q2", 2)  # 3 blocks, 1 block
    mu = MaxUtilizationScheduler(cfg(), None)
    assert mu.schedule([q1, q2], FakeKV(2)).fitting == []  # q1 blocks q2
    r = decoding("r")  # needs 1 block (token 9)
    out = MaxUtilizationScheduler(cfg(max_batch_size=2), None).schedule([r, q1, q2], FakeKV(100, held={"r": 2}))
    assert ids(out.fitting) == ["r", "q1"]


def test_max_utilization_charges_unreferenced_hits_of_a_queued_request():
    q = req("q", 6)  # a chunk of 6 tokens: 2 blocks
    mu = MaxUtilizationScheduler(cfg(), None)
    assert ids(mu.schedule([q], FakeKV(2, hits={"q": (1, 0)})).fitting) == ["q"]  # held by another: free
    assert mu.schedule([q], FakeKV(2, hits={"q": (1, 1)})).fitting == []  # unreferenced: 1 + 2 blocks
    assert ids(mu.schedule([q], FakeKV(3, hits={"q": (1, 1)})).fitting) == ["q"]


def test_max_utilization_admits_more_without_preempting_when_requests_share_a_cached_prefix(h):
    """r runs and holds an 8-token prefix; q1..q3 add 8 tokens of their own and stop after
    prefill. With prefix caching a q's first chunk (8 tokens, the budget) is its own tokens and its
    first two blocks are r's; without, it computes the prefix again into blocks of its own, runs out
    of blocks and is preempted."""
    conf = cfg(max_batch_size=8, max_num_tokens=8)
    runs = {}
    for caching in (True, False):
        kv = h.kv(max_tokens=32, enable_prefix_caching=caching)
        r = h.request("r", list(range(1, 9)), max_tokens=6)
        qs = [h.request(f"q{i}", list(range(1, 9)) + list(range(10 * i, 10 * i + 8)), max_tokens=1) for i in (1, 2, 3)]
        sim = h.MiniExecutor(MaxUtilizationScheduler(conf, None), FCFSMicroBatchScheduler(conf, None), kv)
        sim.add(r)
        sim.step()
        sim.add(*qs)
        runs[caching] = [(rec.fitting, rec.preempted, rec.admitted, rec.chunks) for rec in sim.run()]
        assert [len(x.output_token_ids) for x in (r, *qs)] == [6, 1, 1, 1]
        assert kv.stats().prefix_hit_tokens == (3 * 8 if caching else 0)
        h.assert_pool_idle(kv)
    assert runs[True] == [
        (["r"], [], {"r": 0}, {"r": 8}),
        (["r", "q1", "q2"], [], {"q1": 8, "q2": 8}, {"r": 1, "q1": 7}),
        (["r", "q1", "q2"], [], {}, {"r": 1, "q1": 1, "q2": 6}),
        (["r", "q2", "q3"], [], {"q3": 8}, {"r": 1, "q2": 2, "q3": 5}),
        (["r", "q3"], [], {}, {"r": 1, "q3": 3}),
        (["r"], [], {}, {"r": 1}),
    ]
    assert runs[False] == [
        (["r"], [], {"r": 0}, {"r": 8}),
        (["r", "q1", "q2"], [], {"q1": 0, "q2": 0}, {"r": 1, "q1": 7}),
        (["r", "q1"], ["q2"], {}, {"r": 1, "q1": 7}),
        (["r", "q1"], [], {}, {"r": 1, "q1": 2}),
        (["r", "q2", "q3"], [], {"q2": 0, "q3": 0}, {"r": 1, "q2": 7}),
        (["r", "q2"], ["q3"], {}, {"r": 1, "q2": 7}),
        (["q2", "q3"], [], {"q3": 0}, {"q2": 2, "q3": 6}),
        (["q3"], [], {}, {"q3": 8}),
        (["q3"], [], {}, {"q3": 2}),
    ]


def test_max_utilization_admits_a_request_whose_cached_prefix_fills_most_of_the_pool(h):
    conf = cfg(max_batch_size=4, max_num_tokens=64)
    for caching in (False, True):
        kv = h.kv(max_tokens=32, enable_prefix_caching=caching)  # 8 blocks
        sim = h.MiniExecutor(MaxUtilizationScheduler(conf, None), FCFSMicroBatchScheduler(conf, None), kv)
        sim.add(h.request("a", list(range(1, 17)), max_tokens=1))  # 16 tokens: 4 blocks, then done
        sim.run()
        q = h.request("q", list(range(1, 18)), max_tokens=1)  # 17 tokens: 5 blocks in all
        sim.add(q)
        record = sim.step()
        assert record.fitting == ["q"]
        assert record.admitted == {"q": 16 if caching else 0}
        assert record.chunks == {"q": 1 if caching else 17}
        assert record.finished == ["q"]
        h.assert_pool_idle(kv)


def test_max_utilization_keeps_everyone_when_blocks_suffice():
    a, b, q = decoding("a"), decoding("b"), req("q", 2)  # 1 block each
    held = {"a": 2, "b": 2}
    mu = MaxUtilizationScheduler(cfg(), None)
    out = mu.schedule([a, b, q], FakeKV(2, held=held))
    assert (ids(out.fitting), out.preempted) == (["a", "b"], [])
    out = mu.schedule([a, b, q], FakeKV(3, held=held))
    assert (ids(out.fitting), out.preempted) == (["a", "b", "q"], [])


def test_max_utilization_preempts_the_most_recent_request_and_admits_nothing_that_step():
    a, b, c = decoding("a"), decoding("b"), decoding("c")  # each needs 1 block for token 9
    q = req("q", 2)  # would fit in the block left over
    out = MaxUtilizationScheduler(cfg(), None).schedule([a, b, c, q], FakeKV(1, held={"a": 2, "b": 2, "c": 2}))
    assert ids(out.fitting) == ["a", "b"]
    assert ids(out.preempted) == ["c"]


def test_max_utilization_preempts_more_victims_when_they_share_blocks():
    a, b, c = decoding("a"), decoding("b"), decoding("c")
    kv = FakeKV(0, held={"a": 2, "b": 2, "c": 2}, exclusive={"b": 1, "c": 0})
    out = MaxUtilizationScheduler(cfg(), None).schedule([a, b, c], kv)
    assert ids(out.fitting) == ["a"]
    assert ids(out.preempted) == ["c", "b"]  # most recent first


def test_max_utilization_preempts_the_request_itself_when_no_later_one_is_left():
    a = decoding("a")
    out = MaxUtilizationScheduler(cfg(), None).schedule([a], FakeKV(0, held={"a": 2}))
    assert (out.fitting, ids(out.preempted)) == ([], ["a"])

    a, b = decoding("a"), req("b", 8, computed=4, state=RequestState.CONTEXT)  # b: 4 tokens, 1 block
    out = MaxUtilizationScheduler(cfg(), None).schedule([a, b], FakeKV(1, held={"a": 2, "b": 1}))
    assert ids(out.fitting) == ["a"]
    assert ids(out.preempted) == ["b"]


def test_max_utilization_preempts_by_recompute_and_resumes_from_cached_blocks(h):
    """Two requests outgrow a 4-block pool; the later one is preempted, its tail block is evicted
    for the earlier one's growth, and on resumption its still-cached first block is reused."""
    kv = h.kv(max_tokens=16)  # 4 blocks
    a = h.request("a", [1, 2, 3, 4], max_tokens=6)  # 9 tokens cached at most: 3 blocks
    b = h.request("b", [11, 12, 13, 14], max_tokens=6)
    conf = cfg(max_batch_size=4, max_num_tokens=16)
    sim = h.MiniExecutor(MaxUtilizationScheduler(conf, None), FCFSMicroBatchScheduler(conf, None), kv)
    sim.add(a, b)

    for i in range(5):
        record = sim.step()
        assert record.preempted == []
        assert record.admitted == ({"a": 0, "b": 0} if i == 0 else {})
    assert kv.get_block_table(a) == [0, 2]
    assert kv.get_block_table(b) == [1, 3]
    assert a.num_computed_tokens == b.num_computed_tokens == 8
    assert kv.num_free_blocks == 0

    record = sim.step()  # both need a third block: b, the most recent, is preempted
    assert record.fitting == ["a"]
    assert record.preempted == ["b"]
    assert record.chunks == {"a": 1}
    assert record.finished == ["a"]
    assert b.state is RequestState.QUEUED
    assert b.num_computed_tokens == 0
    assert b.num_preemptions == 1
    assert b.output_token_ids == sim.engine.greedy([11, 12, 13, 14], 5)
    # a took b's tail block 3 (least recently released); b's block 1 is still cached
    assert kv.pool.free == deque([3])
    assert list(kv.pool.evictable) == [1, 2, 0]
    # b's prompt + 5 outputs = 9 tokens: its block 1 is reusable (unreferenced), its block 3 is gone
    assert kv.get_needed_resource_to_completion(b) == 1 + 3 - 1

    record = sim.step()  # b resumes: admission takes block 1, the rest is computed
    assert record.fitting == ["b"]
    assert record.admitted == {"b": 4}
    assert record.chunks == {"b": 5}
    assert record.finished == ["b"]
    assert kv.stats().prefix_hit_tokens == 4
    assert kv.stats().prefix_queried_tokens == 4 + 4 + 9
    assert sim.active == []
    assert a.output_token_ids == sim.engine.greedy([1, 2, 3, 4], 6)
    assert b.output_token_ids == sim.engine.greedy([11, 12, 13, 14], 6)
    assert (a.num_preemptions, b.num_preemptions) == (0, 1)
    assert kv.pool.free == deque([2])
    assert list(kv.pool.evictable) == [0, 3, 1]
    h.assert_pool_idle(kv)


# ---- fcfs ----------------------------------------------------------------------------------------
def test_fcfs_schedules_decodes_first_then_chunks_in_arrival_order():
    p1, d1, p2, d2 = req("p1", 8), decoding("d1"), req("p2", 6), decoding("d2")
    fcfs = FCFSMicroBatchScheduler(cfg(max_num_tokens=10), None)
    batch = fcfs.schedule([p1, d1, p2, d2])
    assert chunks(batch) == [("d1", 1), ("d2", 1), ("p1", 8)]
    assert [r.num_scheduled_tokens for r in (p1, d1, p2, d2)] == [0, 0, 0, 0]  # a plan, not a change

    p1, d1, p2, d2 = req("p1", 8), decoding("d1"), req("p2", 6), decoding("d2")
    batch = FCFSMicroBatchScheduler(cfg(max_num_tokens=12), None).schedule([p1, d1, p2, d2])
    assert chunks(batch) == [("d1", 1), ("d2", 1), ("p1", 8), ("p2", 2)]  # p2 is chunked


def test_fcfs_chunks_a_long_prompt_and_resumes_a_partly_computed_one():
    p = req("p", 10)
    fcfs = FCFSMicroBatchScheduler(cfg(max_num_tokens=4), None)
    assert chunks(fcfs.schedule([p])) == [("p", 4)]
    p = req("p", 10, computed=8, state=RequestState.CONTEXT)
    assert chunks(fcfs.schedule([p])) == [("p", 2)]


def test_fcfs_respects_max_batch_size():
    ds = [decoding(f"d{i}") for i in range(3)]
    p = req("p", 4)
    batch = FCFSMicroBatchScheduler(cfg(max_batch_size=2), None).schedule([p, *ds])
    assert chunks(batch) == [("d0", 1), ("d1", 1)]


def test_fcfs_a_context_request_with_one_token_left_is_not_a_decode():
    c = req("c", 9, computed=8, state=RequestState.CONTEXT)
    g = decoding("g")
    batch = FCFSMicroBatchScheduler(cfg(), None).schedule([c, g])
    assert chunks(batch) == [("g", 1), ("c", 1)]


# ---- equal_progress ------------------------------------------------------------------------------
def test_equal_progress_splits_the_budget_evenly_after_decodes():
    d1, d2 = decoding("d1"), decoding("d2")
    ps = [req(f"p{i}", 20) for i in range(3)]
    batch = EqualProgressMicroBatchScheduler(cfg(max_num_tokens=10), None).schedule([ps[0], d1, ps[1], d2, ps[2]])
    assert chunks(batch) == [("d1", 1), ("d2", 1), ("p0", 3), ("p1", 3), ("p2", 2)]


def test_equal_progress_gives_a_short_request_s_leftover_to_the_others():
    ps = [req("p0", 2), req("p1", 20), req("p2", 20)]
    batch = EqualProgressMicroBatchScheduler(cfg(max_num_tokens=12), None).schedule(ps)
    assert chunks(batch) == [("p0", 2), ("p1", 5), ("p2", 5)]


def test_equal_progress_completes_everything_that_fits():
    ps = [req("p0", 3), req("p1", 5, computed=2, state=RequestState.CONTEXT)]
    batch = EqualProgressMicroBatchScheduler(cfg(max_num_tokens=64), None).schedule(ps)
    assert chunks(batch) == [("p0", 3), ("p1", 3)]


def test_equal_progress_respects_max_batch_size():
    d1, d2 = decoding("d1"), decoding("d2")
    p1, p2 = req("p1", 20), req("p2", 20)
    batch = EqualProgressMicroBatchScheduler(cfg(max_batch_size=3, max_num_tokens=10), None).schedule([p1, p2, d1, d2])
    assert chunks(batch) == [("d1", 1), ("d2", 1), ("p1", 8)]


def test_equal_progress_resets_stale_chunk_sizes():
    p = req("p", 20)
    p.num_scheduled_tokens = 7  # left over from elsewhere: must not count
    batch = EqualProgressMicroBatchScheduler(cfg(max_num_tokens=5), None).schedule([p])
    assert chunks(batch) == [("p", 5)]


# ---- both micro-batch policies -------------------------------------------------------------------
@pytest.mark.parametrize("policy", sorted(MICRO_BATCH))
@pytest.mark.parametrize(
    "max_batch_size, max_num_tokens, expected",
    [
        (8, 2, [("d0", 1), ("d1", 1)]),  # more decodes than token budget
        (2, 64, [("d0", 1), ("d1", 1)]),  # more decodes than batch slots
        (8, 3, [("d0", 1), ("d1", 1), ("d2", 1)]),  # no budget left for the prompt
        (8, 5, [("d0", 1), ("d1", 1), ("d2", 1), ("p", 2)]),
    ],
)
def test_micro_batch_never_exceeds_the_budgets(policy, max_batch_size, max_num_tokens, expected):
    p = req("p", 10)
    ds = [decoding(f"d{i}") for i in range(3)]
    scheduler = MICRO_BATCH[policy](cfg(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens), None)
    batch = scheduler.schedule([p, *ds])
    assert chunks(batch) == expected
    assert sum(chunk.num_tokens for chunk in batch) <= max_num_tokens
    assert len(batch) <= max_batch_size


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("fcfs", [[("a", 4)], [("a", 4)], [("a", 2), ("b", 2)], [("a", 1), ("b", 1)], [("b", 1)]]),
        ("equal_progress", [[("a", 2), ("b", 2)], [("a", 3), ("b", 1)], [("b", 1), ("a", 3)], [("a", 2)], [("a", 1)]]),
    ],
)
def test_chunked_prefill_over_steps(h, policy, expected):
    kv = h.kv(max_tokens=32)
    a = h.request("a", list(range(1, 11)), max_tokens=2)  # 10 tokens
    b = h.request("b", [21, 22, 23], max_tokens=2)
    conf = cfg(max_batch_size=4, max_num_tokens=4)
    sim = h.MiniExecutor(GuaranteedNoEvictScheduler(conf, None), MICRO_BATCH[policy](conf, None), kv)
    sim.add(a, b)
    records = sim.run()
    assert [list(r.chunks.items()) for r in records] == expected
    assert len(a.output_token_ids) == len(b.output_token_ids) == 2
    h.assert_pool_idle(kv)


# ---- every pairing of policies runs a workload to completion ----------------------------------
@pytest.mark.parametrize("micro_batch", sorted(MICRO_BATCH))
@pytest.mark.parametrize("capacity", sorted(CAPACITY))
def test_every_policy_pair_completes_a_workload_within_its_budgets(h, capacity, micro_batch):
    kv = h.kv(max_tokens=40)  # 10 blocks
    prefix = list(range(1, 9))
    requests = [
        h.request("r0", prefix + [100], max_tokens=4),
        h.request("r1", prefix + [101, 102], max_tokens=5),
        h.request("r2", list(range(200, 206)), max_tokens=6),
        h.request("r3", prefix + [103], max_tokens=3),
        h.request("r4", list(range(300, 312)), max_tokens=4),
    ]
    conf = cfg(max_batch_size=3, max_num_tokens=8)
    sim = h.MiniExecutor(CAPACITY[capacity](conf, None), MICRO_BATCH[micro_batch](conf, None), kv)
    sim.add(*requests)
    records = sim.run()
    for record in records:
        assert len(record.chunks) <= 3
        assert sum(record.chunks.values()) <= 8
        assert all(n > 0 for n in record.chunks.values())
        assert record.preempted == []
    assert [len(r.output_token_ids) for r in requests] == [4, 5, 6, 3, 4]
    assert all(r.state is RequestState.FINISHED for r in requests)
    # r0 and r1 are admitted together (nothing cached yet; r1 may still pick up r0's prefix blocks
    # while it catches up, as the policy's chunks allow); r3 comes later and reuses it at admission
    assert {rid: hit for record in records for rid, hit in record.admitted.items() if hit} == {"r3": 8}
    assert kv.stats().prefix_queried_tokens == 9 + 10 + 6 + 9 + 12
    hits = kv.stats().prefix_hit_tokens
    assert hits in (8, 16)
    # every prompt token and every output but the last is computed once, except the hit ones
    assert sum(sum(record.chunks.values()) for record in records) == 46 + (3 + 4 + 5 + 2 + 3) - hits
    h.assert_pool_idle(kv)
