"""Conformance checks every implementation of a kind must pass, run through the real `PyExecutor`.

Each check (the `conformance` entry of its kind in `framework.plugins.kinds`) is a `Check`: named
cases, each building the component from a factory and a config as the engine's builder does, and
driving a workload to completion through a PyExecutor on a `framework.testing.FakeEngine` (the
model engine check uses a tiny random Llama instead). Call a check to run all its cases:

    from framework.plugins.conformance import check_capacity_scheduler
    check_capacity_scheduler(MyScheduler, MyConfig())

or let `framework.testing.conformance_suite` turn its cases into parametrised pytest tests.
See docs/writing-plugins.md for what each kind's check asserts.
"""

from __future__ import annotations

import random
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Callable

from framework.request import FinishReason, LlmRequest, RequestState
from framework.sampling_params import SamplingParams
from framework.testing import (
    FakeEngine, OracleDrafter, make_decoder, make_engine, make_executor, make_router, make_scheduler, run_to_completion, tiny_kv_cache, watch,
)


@dataclass(frozen=True)
class Check:
    """A kind's conformance check: calling it runs every case in order."""

    cases: dict[str, Callable]  # name -> case(factory, config)

    def __call__(self, factory, config=None) -> None:
        for case in self.cases.values():
            case(factory, config)


@dataclass(frozen=True)
class Scenario:
    """A workload and the budgets it runs under."""

    max_batch_size: int
    max_num_tokens: int
    seed: int = 0
    drafts: bool = False  # an OracleDrafter proposes 2 right and 1 wrong token per decode step
    staggered: bool = False  # requests arrive over the first steps instead of all at once
    sampled: bool = False  # half the requests sample (some seeded) instead of greedy

    @property
    def budgets(self) -> dict[str, int]:
        return {"max_batch_size": self.max_batch_size, "max_num_tokens": self.max_num_tokens}


TIGHT = Scenario(4, 16)  # chunked prefill, waiting for blocks, preemption under max_utilization
SCENARIOS = {
    "tight_budgets": TIGHT,
    "roomy_budgets": Scenario(16, 64, seed=1),
    "draft_tokens": replace(TIGHT, seed=2, drafts=True),
    "staggered_arrivals": replace(TIGHT, seed=3, staggered=True),
}


def workload(seed: int = 0, n: int = 10, vocab: int = 1000, sampled: bool = False) -> list[LlmRequest]:
    """Requests of mixed prompt and output lengths; every other one starts with a shared 12-token
    prefix, and the last two are that prefix alone (whole blocks: once cached, all of the prompt
    but its last token is reused); a few carry a priority, and they come from three tenants (one of
    them unnamed), some with a time-to-first-token deadline. With `sampled`, every other request
    samples, half of those with a seed of its own."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(12)]
    requests = []
    for i in range(n):
        own = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 20))] if i < n - 2 else []
        params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0.0, ignore_eos=True)
        if sampled and i % 2:
            params = replace(params, temperature=0.8, top_k=rng.choice([0, 50]), top_p=0.9, seed=i if i % 4 == 1 else None)
        priority = rng.choice([None, None, 0, 1, 2])
        metadata = {"priority": priority, "tenant": ("a", "b", None)[i % 3], "ttft_slo_ms": 50.0 if i % 4 == 0 else None}
        requests.append(LlmRequest(str(i), shared + own if i % 2 or not own else own, params, **metadata))
    return requests


def _arrivals(requests: list[LlmRequest], staggered: bool) -> dict[int, list[LlmRequest]]:
    if not staggered:
        return {0: requests}
    return {step: requests[2 * step : 2 * step + 2] for step in range((len(requests) + 1) // 2)}


# ---- the contracts every run asserts ---------------------------------------------------------
def run_conforming(executor, scenario: Scenario, requests: list[LlmRequest], greedy: bool = True, judges=()):
    """Drive `requests` to completion and assert the seam contracts: each scheduler answer well
    formed (judged as it is given, with any extra `judges`: (component, method, label, judge)), each
    step's batch within the budgets, every request finished with all its tokens (with `greedy`, the
    fake engine's greedy continuation), the KV pool full again. Returns the trace."""
    violations: list[str] = []
    try:
        with _judging(_scheduler_judges(executor) + list(judges), violations):
            trace = run_to_completion(executor, _arrivals(requests, scenario.staggered), max_steps=2000)
    finally:
        assert not violations, violations[0]
    _assert_within_budgets(trace, scenario)
    for request in requests:
        _assert_finished(request, executor.model_engine if greedy else None)
    _assert_pool_full(executor.kv_cache_manager)
    return trace


def _scheduler_judges(executor) -> list[tuple]:
    return [
        (executor.capacity_scheduler, "schedule", "capacity scheduler", _capacity_judge),
        (executor.micro_batch_scheduler, "schedule", "micro-batch scheduler", _micro_batch_judge),
    ]


@contextmanager
def _judging(judges, violations: list[str]):
    with ExitStack() as stack:
        for component, method, label, judge in judges:
            stack.enter_context(watch(component, method, _judged(label, judge, violations)))
        yield


def _judged(label: str, judge, violations: list[str]):
    """An observer for `watch`: before each call, `judge(*args)` gives the test of its answer (a
    problem or None); each problem is recorded as "label: problem"."""

    def before(*args):
        test = judge(*args)

        def after(answer):
            problem = test(answer)
            if problem:
                violations.append(f"{label}: {problem}")

        return after

    return before


def _capacity_judge(active, kv_cache):
    states = {id(r): r.state for r in active}
    return lambda out: _capacity_problem(out, active, states)


def _capacity_problem(out, active, states) -> str | None:
    from framework.scheduler.base import CapacityOutput

    if not isinstance(out, CapacityOutput):
        return f"schedule() returned {type(out).__name__}, not a CapacityOutput"
    chosen = out.fitting + out.preempted
    if len({id(r) for r in chosen}) < len(chosen):
        return "a request appears twice in fitting + preempted"
    if any(id(r) not in states for r in chosen):
        return "returned a request that is not active"
    if any(states[id(r)] is RequestState.QUEUED for r in out.preempted):
        return "preempted a queued request (only running ones can be)"
    if any(r.state is not states[id(r)] for r in active):
        return "changed a request's state (the executor does that)"
    return None


def _micro_batch_judge(fitting):
    return lambda batch: _micro_batch_problem(batch, fitting)


def _micro_batch_problem(plan, fitting) -> str | None:
    from framework.scheduler.base import Chunk

    if not isinstance(plan, list) or not all(isinstance(chunk, Chunk) for chunk in plan):
        return f"schedule() returned {type(plan).__name__}, not a list of Chunk"
    batch = [chunk.request for chunk in plan]
    if len({id(r) for r in batch}) < len(batch):
        return "scheduled a request twice"
    if not {id(r) for r in batch} <= {id(r) for r in fitting}:
        return "scheduled a request the capacity scheduler did not pass it"
    for chunk in plan:
        request = chunk.request
        if request.num_scheduled_tokens:
            return f"request {request.request_id!r}: schedule() set num_scheduled_tokens itself (the executor applies the plan)"
        if not 1 <= chunk.num_tokens <= request.num_missing_tokens:
            return f"request {request.request_id!r}: a chunk of {chunk.num_tokens} tokens, outside [1, num_missing_tokens={request.num_missing_tokens}]"
    return None


def _assert_within_budgets(trace, scenario: Scenario) -> None:
    for number, step in enumerate(trace.steps):
        assert len(step.batch) <= scenario.max_batch_size, f"step {number} ran {len(step.batch)} requests; max_batch_size={scenario.max_batch_size}"
        tokens = sum(step.batch.values())
        assert tokens <= scenario.max_num_tokens, f"step {number} computed {tokens} tokens; max_num_tokens={scenario.max_num_tokens}"


def _assert_finished(request: LlmRequest, engine: FakeEngine | None) -> None:
    rid, params = request.request_id, request.sampling_params
    assert request.error is None, f"request {rid!r} failed: {request.error}"
    assert request.finish_reason is FinishReason.LENGTH and len(request.output_token_ids) == params.max_tokens, (
        f"request {rid!r} finished ({request.finish_reason}) with {len(request.output_token_ids)} of {params.max_tokens} tokens"
    )
    if engine is not None:
        expected = engine.greedy(request.prompt_token_ids, params.max_tokens)
        assert request.output_token_ids == expected, f"request {rid!r} produced {request.output_token_ids}, not the greedy {expected}"


def _assert_pool_full(kv) -> None:
    assert kv.num_free_blocks == kv.get_max_resource_count(), (
        f"blocks leaked: {kv.get_max_resource_count() - kv.num_free_blocks} of {kv.get_max_resource_count()} still taken after every request finished"
    )
    stats = kv.stats()
    assert stats.num_used_blocks == 0 and stats.num_blocks == kv.get_max_resource_count(), (
        f"stats() counts {stats.num_used_blocks} used blocks of {stats.num_blocks} after every request finished"
    )


def _executor(scenario: Scenario, **components):
    engine = FakeEngine(vocab_size=1024)
    drafter = OracleDrafter(engine.next_token, engine.vocab_size) if scenario.drafts else None
    return make_executor(engine=engine, drafter=drafter, **scenario.budgets, **components)


# ---- capacity schedulers ---------------------------------------------------------------------
def _capacity_case(scenario: Scenario):
    def case(factory, config):
        from framework.scheduler.base import CapacityScheduler

        capacity = make_scheduler(factory, config, **scenario.budgets)
        assert isinstance(capacity, CapacityScheduler), f"{type(capacity).__name__} is not a CapacityScheduler"
        run_conforming(_executor(scenario, capacity=capacity), scenario, workload(scenario.seed))

    return case


check_capacity_scheduler = Check({name: _capacity_case(scenario) for name, scenario in SCENARIOS.items()})


# ---- micro-batch schedulers ------------------------------------------------------------------
CAPACITY_PARTNERS = ("framework.scheduler.capacity:GuaranteedNoEvictScheduler", "framework.scheduler.capacity:MaxUtilizationScheduler")


def _micro_batch_case(scenario: Scenario):
    def case(factory, config):
        from framework.scheduler.base import MicroBatchScheduler

        for partner in CAPACITY_PARTNERS:
            micro_batch = make_scheduler(factory, config, **scenario.budgets)
            assert isinstance(micro_batch, MicroBatchScheduler), f"{type(micro_batch).__name__} is not a MicroBatchScheduler"
            capacity = make_scheduler(partner, **scenario.budgets)
            run_conforming(_executor(scenario, capacity=capacity, micro_batch=micro_batch), scenario, workload(scenario.seed))

    return case


check_micro_batch_scheduler = Check({name: _micro_batch_case(scenario) for name, scenario in SCENARIOS.items()})


# ---- KV cache managers -----------------------------------------------------------------------
def _kv_cache(factory, config):
    from framework.resources.base import KVCacheManager

    kv = tiny_kv_cache(factory=factory, config=config)
    assert isinstance(kv, KVCacheManager), f"{type(kv).__name__} is not a KVCacheManager"
    return kv


def _kv_cache_layout(factory, config):
    kv = _kv_cache(factory, config)
    blocks = kv.get_max_resource_count()
    assert kv.num_free_blocks == blocks > 0, f"a new cache has {kv.num_free_blocks} free blocks of {blocks}"
    caches = kv.get_kv_caches()
    assert len(caches) == 1, f"{len(caches)} (K, V) pairs for a model of 1 layer"
    for k, v in caches:
        assert k.shape == v.shape == (1, blocks, kv.block_size, 2), f"K {tuple(k.shape)}, V {tuple(v.shape)}: not [kv_heads, num_blocks, block_size, head_dim]"


def _kv_cache_case(scenario: Scenario, capacity: str = "framework.scheduler.capacity:MaxUtilizationScheduler"):
    def case(factory, config):
        executor = _executor(scenario, capacity=make_scheduler(capacity, **scenario.budgets), kv_cache=_kv_cache(factory, config))
        run_conforming(executor, scenario, workload(scenario.seed))

    return case


def _kv_cache_refuses_what_never_fits(factory, config):
    """A request larger than the whole pool is refused up front (never_fits), not left waiting."""
    executor = _executor(TIGHT, kv_cache=_kv_cache(factory, config))
    too_big = LlmRequest("too_big", list(range(3, 3 + 70)), SamplingParams(max_tokens=4, temperature=0.0))
    run_to_completion(executor, [too_big], max_steps=50)
    assert too_big.finish_reason is FinishReason.ERROR and too_big.error, (
        f"a request of 73 tokens in a pool of {executor.kv_cache_manager.get_max_resource_count()} blocks was not "
        f"refused ({too_big.finish_reason}): answer never_fits()"
    )
    _assert_pool_full(executor.kv_cache_manager)


check_kv_cache_manager = Check({
    "layout": _kv_cache_layout,
    **{name: _kv_cache_case(scenario) for name, scenario in SCENARIOS.items()},
    "no_preemption": _kv_cache_case(TIGHT, "framework.scheduler.capacity:GuaranteedNoEvictScheduler"),
    "refuses_what_never_fits": _kv_cache_refuses_what_never_fits,
})


# ---- decoders --------------------------------------------------------------------------------
def _decoder(factory, config):
    from framework.decoder.base import Decoder

    decoder = make_decoder(factory, config)
    assert isinstance(decoder, Decoder), f"{type(decoder).__name__} is not a Decoder"
    return decoder


def processed_logits(decoder, requests, logits):
    """The logits a temperature-0 request takes the argmax of: the decoder's own
    `processed_logits(requests, logits)` (a bias, a mask, penalties; the raw logits by default).
    Called before `decode`, with the same arguments."""
    return decoder.processed_logits(requests, logits.clone())


def _decoder_judge(decoder):
    def judge(requests, logits, drafts=None):
        greedy = [i for i, r in enumerate(requests) if r.sampling_params.temperature == 0]
        expected = processed_logits(decoder, requests, logits)[greedy].argmax(-1).tolist() if greedy else []
        return lambda out: _decoder_problem(out, requests, logits.shape[-1], greedy, expected)

    return judge


def _decoder_problem(out, requests, vocab, greedy, expected) -> str | None:
    tokens = out.token_ids
    if len(tokens) != len(requests):
        return f"decode() gave {len(tokens)} tokens for {len(requests)} requests"
    if not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
        return f"decode() gave token ids outside [0, {vocab}) or not ints: {tokens}"
    if out.logprobs is not None and len(out.logprobs) != len(requests):
        return f"decode() gave {len(out.logprobs)} logprobs entries for {len(requests)} requests"
    got = [tokens[i] for i in greedy]
    if got != expected:
        return f"temperature-0 requests got {got}, not the argmax of the (processed) logits {expected}"
    return None


def _run_decoder(factory, config, scenario: Scenario) -> list[LlmRequest]:
    decoder = _decoder(factory, config)
    requests = workload(scenario.seed, sampled=scenario.sampled)
    judges = [(decoder, method, "decoder", _decoder_judge(decoder)) for method in ("decode", "verify")]
    run_conforming(_executor(scenario, decoder=decoder), scenario, requests, greedy=False, judges=judges)
    return requests


def _decoder_greedy(factory, config):
    """Temperature 0 takes the argmax of the decoder's (processed) logits, one row per request,
    verify steps included; an empty batch gives no tokens."""
    import torch

    assert _decoder(factory, config).decode([], torch.zeros(0, 16)).token_ids == [], "an empty batch must give no tokens"
    _run_decoder(factory, config, replace(TIGHT, drafts=True))


def _decoder_seeded(factory, config):
    """A seeded request draws the same tokens whatever else is in its batch."""
    seeded = replace(TIGHT, seed=5, sampled=True)
    first = _run_decoder(factory, config, seeded)
    second = _run_decoder(factory, config, replace(seeded, max_batch_size=16, max_num_tokens=64))
    for a, b in zip(first, second):
        if a.sampling_params.seed is not None:
            assert a.output_token_ids == b.output_token_ids, (
                f"request {a.request_id!r} (seed {a.sampling_params.seed}) drew {a.output_token_ids} in one batch and {b.output_token_ids} in another"
            )


check_decoder = Check({"greedy_is_the_argmax": _decoder_greedy, "seeded_sampling_ignores_the_batch": _decoder_seeded})


# ---- model engines ---------------------------------------------------------------------------
def _engine(factory, config):
    from framework.engine.base import ModelEngine

    engine = make_engine(factory, config)
    assert isinstance(engine, ModelEngine), f"{type(engine).__name__} is not a ModelEngine"
    return engine


def _engine_chunks_and_neighbours(factory, config):
    """The same logits for a prompt computed in one chunk, in several, and beside another request."""
    import torch

    engine = _engine(factory, config)
    prompt = list(range(3, 23))
    whole = _last_logits(engine, [20], prompt)
    torch.testing.assert_close(_last_logits(engine, [7, 9, 4], prompt), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_last_logits(engine, [20], prompt, neighbour=list(range(40, 51))), whole, rtol=1e-4, atol=1e-4)


def _last_logits(engine, chunks, prompt, neighbour=None):
    from framework.engine.base import ForwardOutput
    from framework.resources.base import ResourceManager

    rm = ResourceManager({"kv_cache": tiny_kv_cache(256, enable_prefix_caching=False, spec=engine.kv_cache_spec())})
    request = LlmRequest("r", list(prompt), SamplingParams(max_tokens=1), state=RequestState.CONTEXT)
    others = [LlmRequest("n", list(neighbour), SamplingParams(max_tokens=1), state=RequestState.CONTEXT)] if neighbour else []
    for n in chunks:
        request.num_scheduled_tokens = n
        for other in others:
            other.num_scheduled_tokens = other.num_missing_tokens
        batch = others + [request]
        rm.prepare_resources(batch)
        out = engine.forward(batch, rm)
        assert isinstance(out, ForwardOutput), f"forward() returned {type(out).__name__}, not a ForwardOutput"
        for r in batch:
            r.num_computed_tokens += r.num_scheduled_tokens
        others = []
    rows, width = out.logits.shape
    assert out.sampled[-1] is request and rows == len(out.sampled) and 1 <= width <= engine.vocab_size, (
        f"forward() returned logits of shape {tuple(out.logits.shape)} for {len(out.sampled)} sampled requests and a vocabulary of {engine.vocab_size}"
    )
    return out.logits[-1]


def _engine_through_the_executor(factory, config):
    """Greedy outputs of a workload are the same with roomy budgets and with tight ones, chunked
    prefill, prefix reuse, preemption and verify steps on the way."""
    engine = _engine(factory, config)
    roomy = _run_engine(engine, Scenario(16, 256, seed=4))
    continuation = {tuple(prompt + out[:i]): out[i] for prompt, out in roomy for i in range(len(out))}
    drafter = OracleDrafter(lambda context: continuation.get(tuple(context), 0), engine.vocab_size)
    tight = _run_engine(engine, replace(TIGHT, seed=4, drafts=True), drafter)
    assert tight == roomy, "greedy outputs differ between roomy budgets and tight ones with chunks and drafts"


def _run_engine(engine, scenario: Scenario, drafter=None) -> list[tuple[list[int], list[int]]]:
    kv = tiny_kv_cache(128, spec=engine.kv_cache_spec())
    capacity = make_scheduler("framework.scheduler.capacity:MaxUtilizationScheduler", **scenario.budgets)
    executor = make_executor(engine=engine, kv_cache=kv, capacity=capacity, drafter=drafter, **scenario.budgets)
    requests = workload(scenario.seed, vocab=min(engine.vocab_size, 1000))
    run_conforming(executor, scenario, requests, greedy=False)
    return [(r.prompt_token_ids, r.output_token_ids) for r in requests]


check_model_engine = Check({"chunks_and_neighbours": _engine_chunks_and_neighbours, "through_the_executor": _engine_through_the_executor})


# ---- drafters ----------------------------------------------------------------------------------
def make_drafter(factory, config=None, *, target=None, num_tokens: int = 3, max_batch_size: int = 8):
    """A drafter built as the builder builds one, from the `speculative` group's settings, for the
    `target` engine (a FakeEngine by default) and a KV cache of `tiny_kv_cache()`'s size; a draft
    model it loads runs in float32 on the CPU."""
    from framework.config import KVCacheConfig, SpeculativeConfig
    from framework.drafter.base import DraftContext, Drafter
    from framework.testing import _group_config, _resolve

    group = _group_config(SpeculativeConfig(num_tokens=num_tokens, max_batch_size=max_batch_size), config)
    kv_cache = KVCacheConfig(block_size=4, max_tokens=64)
    context = DraftContext(target or FakeEngine(), kv_cache, _load_draft_engine)
    drafter = _resolve(factory)(group, config, context)
    assert isinstance(drafter, Drafter), f"{type(drafter).__name__} is not a Drafter"
    return drafter


def _load_draft_engine(path: str):
    from framework.models.checkpoint import resolve_checkpoint

    return make_engine("framework.engine.pytorch_model_engine:PyTorchModelEngine", checkpoint_dir=resolve_checkpoint(path))


def _drafter_judge(requests):
    from framework.scheduler.base import is_decoding

    before = {id(r): list(r.draft_token_ids) for r in requests}
    decoding = {id(r) for r in requests if is_decoding(r)}

    def problem(_):
        for r in requests:
            drafts = r.draft_token_ids
            if drafts != before[id(r)] and id(r) not in decoding:
                return f"propose() gave drafts to request {r.request_id!r}, which is not decoding"
            if len(drafts) > 3 or not all(isinstance(t, int) and 0 <= t < 1024 for t in drafts):
                return f"propose() gave request {r.request_id!r} drafts {drafts[:8]} (at most 3 ids below the vocabulary)"
        return None

    return problem


def _drafter_case(scenario: Scenario, capacity: str | None = None):
    def case(factory, config):
        engine = FakeEngine(vocab_size=1024)
        drafter = make_drafter(factory, config, target=engine, max_batch_size=scenario.max_batch_size)
        scheduler = make_scheduler(capacity, **scenario.budgets) if capacity else None
        executor = make_executor(engine=engine, drafter=drafter, capacity=scheduler, **scenario.budgets)
        judges = [(drafter, "propose", "drafter", _drafter_judge)]
        run_conforming(executor, scenario, workload(scenario.seed, sampled=scenario.sampled), greedy=not scenario.sampled, judges=judges)
        if drafter.request_states is not None:
            assert len(drafter.request_states) == 0, "the drafter kept state for requests that finished"
            own_cache = getattr(drafter.request_states, "kv_cache", None)  # a draft model's
            if own_cache is not None:
                _assert_pool_full(own_cache)

    return case


check_drafter = Check({
    "tight_budgets": _drafter_case(TIGHT),
    "roomy_budgets": _drafter_case(SCENARIOS["roomy_budgets"]),
    "sampled_requests": _drafter_case(replace(TIGHT, seed=4, sampled=True)),
    "preemption": _drafter_case(TIGHT, "framework.scheduler.capacity:MaxUtilizationScheduler"),
})


# ---- routers -----------------------------------------------------------------------------------
def _router_decisions(factory, config, num_replicas: int, seed: int) -> list[int]:
    """The router's answers for `workload(seed)`'s prompts, twice over, under loads that change
    with every decision (the chosen replica gets the request)."""
    from framework.router.base import ReplicaLoad

    router = make_router(factory, config)
    running = [0] * num_replicas
    decisions = []
    for request in workload(seed) * 2:
        loads = [ReplicaLoad(i, running[i], i % 2, running[i] / 10) for i in range(num_replicas)]
        chosen = router.route(list(request.prompt_token_ids), loads)
        assert isinstance(chosen, int) and 0 <= chosen < num_replicas, (
            f"route answered {chosen!r}; it must be a replica index in [0, {num_replicas})"
        )
        running[chosen] += 1
        decisions.append(chosen)
    return decisions


def _router_answers_a_replica(factory, config):
    for num_replicas in (1, 2, 3):
        _router_decisions(factory, config, num_replicas, seed=num_replicas)


def _router_is_deterministic(factory, config):
    first, second = (_router_decisions(factory, config, 3, seed=5) for _ in range(2))
    assert first == second, f"two routers given the same requests and loads decided {first} and {second}"


check_router = Check({
    "answers_a_replica": _router_answers_a_replica,
    "deterministic": _router_is_deterministic,
})
