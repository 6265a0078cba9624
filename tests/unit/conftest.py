"""Shared helpers for the CPU-only unit tests: tiny KV cache managers, requests, the executor's
half-steps around the forward with a fake "sampler" (for tests of the KV cache alone), and
`MiniExecutor`, the real step loop on a fake model that records what each step did.

The helpers are plain functions and classes exposed through the `h` fixture, so that test files do
not import this module by name.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import pytest
import torch

from framework.request import LlmRequest, RequestState
from framework.resources.base import KVCacheSpec
from framework.resources.paged_kv_cache import PagedKVCacheManager
from framework.sampling_params import SamplingParams


def new_request(request_id: str, prompt, max_tokens: int = 8) -> LlmRequest:
    return LlmRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def kv_config(block_size=4, max_tokens=32, enable_prefix_caching=True, memory_fraction=0.0):
    return types.SimpleNamespace(
        block_size=block_size,
        max_tokens=max_tokens,
        memory_fraction=memory_fraction,
        enable_prefix_caching=enable_prefix_caching,
    )


def kv_spec(num_layers=1, max_model_len=128) -> KVCacheSpec:
    return KVCacheSpec(
        num_layers=num_layers,
        num_kv_heads=1,
        head_dim=2,
        dtype=torch.float32,
        device=torch.device("cpu"),
        max_model_len=max_model_len,
    )


def new_kv(max_tokens=32, block_size=4, enable_prefix_caching=True, max_model_len=128, num_layers=1):
    return PagedKVCacheManager(
        kv_config(block_size, max_tokens, enable_prefix_caching),
        None,
        kv_spec(num_layers, max_model_len),
    )


def sample_token(request: LlmRequest) -> int:
    """The fake sampler: deterministic, independent of the batch."""
    return 500 + len(request.output_token_ids)


def admit(kv, *requests: LlmRequest) -> None:
    """The executor's admission, right after the capacity scheduler: each request still QUEUED (new,
    or preempted) enters CONTEXT and `kv.admit` attaches its cached prefix, advancing its cursor.
    Requests already running are left alone."""
    for request in requests:
        if request.state is RequestState.QUEUED:
            request.state = RequestState.CONTEXT
            kv.admit(request)


def prepare(kv, chunks: dict) -> list[LlmRequest]:
    """The executor's half-step up to the forward: every QUEUED request of `chunks` is admitted
    first (in order, as the executor admits the whole fitting list before the micro-batch scheduler
    runs), then each gets its chunk (`num_scheduled_tokens`, counted from the cursor after
    admission: a prefix hit is not part of it), then `prepare_resources` allocates."""
    scheduled = list(chunks)
    admit(kv, *scheduled)
    for request, n in chunks.items():
        assert 1 <= n <= request.num_missing_tokens, f"chunk {n} of {request.request_id} outside [1, {request.num_missing_tokens}]"
        request.num_scheduled_tokens = n
    kv.prepare_resources(scheduled)
    for request in scheduled:
        covered = len(kv.get_block_table(request)) * kv.block_size
        assert covered >= request.num_computed_tokens + request.num_scheduled_tokens, "a chunk without blocks"
    return scheduled


def complete(kv, scheduled: list[LlmRequest], outputs: dict | None = None) -> list[LlmRequest]:
    """The executor's half-step after `prepare_resources`: cursors advance by the chunks, a request
    that has computed all its tokens samples one (from `outputs` or the fake sampler) and enters
    GENERATION, then `update_resources` runs and chunks reset. Returns the requests that sampled."""
    outputs = outputs or {}
    sampled = [r for r in scheduled if r.num_computed_tokens + r.num_scheduled_tokens == r.num_tokens]
    for request in scheduled:
        request.num_computed_tokens += request.num_scheduled_tokens
    for request in sampled:
        request.output_token_ids.append(outputs.get(request, sample_token(request)))
        request.state = RequestState.GENERATION
    kv.update_resources(scheduled)
    for request in scheduled:
        request.num_scheduled_tokens = 0
    return sampled


def step(kv, chunks: dict, outputs: dict | None = None) -> list[LlmRequest]:
    return complete(kv, prepare(kv, chunks), outputs)


def finish(kv, request: LlmRequest) -> None:
    request.state = RequestState.FINISHED
    kv.free_resources(request)


def assert_pool_idle(kv) -> None:
    """Every block is back: unreferenced, in exactly one of free / evictable, no tables left."""
    pool = kv.pool
    assert pool.ref_counts == [0] * pool.num_blocks
    assert len(pool.free) + len(pool.evictable) == pool.num_blocks
    assert set(pool.free) | set(pool.evictable) == set(range(pool.num_blocks))
    assert all(pool.block_hash[b] is None for b in pool.free)
    assert all(pool.block_hash[b] is not None for b in pool.evictable)
    assert sorted(pool.cached.values()) == sorted(pool.evictable)
    assert kv.block_tables == {}
    assert kv.block_hashes == {}
    assert kv.num_free_blocks == pool.num_blocks


@dataclass
class StepRecord:
    fitting: list[str]
    preempted: list[str]
    admitted: dict[str, int]  # requests admitted this step (QUEUED -> CONTEXT) -> prefix hit tokens
    chunks: dict[str, int]  # as chosen by the micro-batch scheduler: all computed (hits are not in them)
    finished: list[str] = field(default_factory=list)


class MiniExecutor:
    """A real `PyExecutor` over `framework.testing.FakeEngine` with the given schedulers and KV
    cache, recording each step as the components saw it (what was admitted, with its prefix hit, is
    added to `framework.testing.observe`'s trace)."""

    def __init__(self, capacity, micro_batch, kv):
        from framework.executor.py_executor import PyExecutor
        from framework.resources.base import ResourceManager
        from framework.testing import FakeEngine, make_decoder

        self.kv = kv
        self.engine = FakeEngine(max_model_len=kv.spec.max_model_len)
        self.executor = PyExecutor(capacity, micro_batch, ResourceManager({"kv_cache": kv}), self.engine, make_decoder())
        self.records: list[StepRecord] = []

    @property
    def active(self) -> list[LlmRequest]:
        return self.executor.active

    def add(self, *requests: LlmRequest) -> None:
        for request in requests:
            self.executor.enqueue(request)

    def step(self) -> StepRecord:
        from framework.testing import observe, watch

        admitted: dict[str, int] = {}
        queued: set[int] = set()

        def capacity(active, kv_cache):
            return lambda out: queued.update(id(r) for r in out.fitting if r.state is RequestState.QUEUED)

        def admit(request):
            return lambda _: admitted.update({request.request_id: request.num_computed_tokens} if id(request) in queued else {})

        with observe(self.executor) as trace, watch(self.executor.capacity_scheduler, "schedule", capacity), watch(self.kv, "admit", admit):
            self.executor.step()
        for request in self.executor.active:
            assert request.error is None, request.error
        done = trace.steps[-1]
        record = StepRecord(done.fitting, done.preempted, admitted, done.batch, done.finished)
        self.records.append(record)
        return record

    def run(self, max_steps: int = 200) -> list[StepRecord]:
        for _ in range(max_steps):
            if not self.executor.has_work():
                return self.records
            self.step()
        raise AssertionError(f"not done after {max_steps} steps: {[r.request_id for r in self.active]}")


@pytest.fixture
def h():
    """The helpers above, as one namespace."""
    return types.SimpleNamespace(
        request=new_request,
        kv=new_kv,
        kv_config=kv_config,
        kv_spec=kv_spec,
        admit=admit,
        prepare=prepare,
        complete=complete,
        step=step,
        finish=finish,
        sample_token=sample_token,
        assert_pool_idle=assert_pool_idle,
        MiniExecutor=MiniExecutor,
    )
