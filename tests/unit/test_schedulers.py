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
    """KVCacheCapacity with explicit numbers: `free` blocks, blocks `held` per request id and
    `exclusive` blocks per request id (default: all it holds)."""

    block_size = BS

    def __init__(self, free, total=64, held=None, exclusive=None):
        self.free = free
        self.total = total
        self.held = dict(held or {})
        self.exclusive = dict(exclusive or {})

    @property
    def num_free_blocks(self):
        return self.free

    def blocks_needed(self, request, num_new_tokens):
        end = request.num_computed_tokens + num_new_tokens
        return max(0, _ceil_div(end, BS) - self.held.get(request.request_id, 0))

    def get_needed_resource_to_completion(self, request):
        return max(0, _ceil_div(request.max_total_tokens - 1, BS) - self.held.get(request.request_id, 0))

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


def chunks(batch):
    return [(r.request_id, r.num_scheduled_tokens) for r in batch]


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

    for _ in range(5):
        record = sim.step()
        assert record.preempted == []
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
    assert b.output_token_ids == [500, 501, 502, 503, 504]
    # a took b's tail block 3 (least recently released); b's block 1 is still cached
    assert kv.pool.free == deque([3])
    assert list(kv.pool.evictable) == [1, 2, 0]

    record = sim.step()  # b resumes: prompt + 5 outputs, block 1 is a hit
    assert record.fitting == ["b"]
    assert record.chunks == {"b": 9}
    assert record.computed == {"b": 5}
    assert record.finished == ["b"]
    assert kv.stats().prefix_hit_tokens == 4
    assert sim.active == []
    assert a.output_token_ids == b.output_token_ids == [500, 501, 502, 503, 504, 505]
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
    assert p2.num_scheduled_tokens == 0

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
    assert sum(r.num_scheduled_tokens for r in batch) <= max_num_tokens
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
        if capacity != "max_utilization":
            assert record.preempted == []
    assert [len(r.output_token_ids) for r in requests] == [4, 5, 6, 3, 4]
    assert all(r.state is RequestState.FINISHED for r in requests)
    assert kv.stats().prefix_hit_tokens > 0  # the shared prefix was reused
    h.assert_pool_idle(kv)
