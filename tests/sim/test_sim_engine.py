"""The simulated engine: the real schedulers and KV cache managers run around it through the
conformance contracts, its virtual clock makes runs deterministic, and its placeholder logits make
the unchanged decoder emit valid tokens and end plain requests sensibly."""

from __future__ import annotations

import random

import pytest

from framework.engine.config import SimEngineConfig
from framework.engine.clock import VirtualClock, WallClock
from framework.engine.sim_engine import SimModelEngine, first_plain_token
from framework.plugins import conformance
from framework.plugins.manager import create_plugin_manager
from framework.request import FinishReason, LlmRequest
from framework.sampling_params import SamplingParams
from framework.sim.step_shape import StepShape
from framework.testing import OracleDrafter, make_decoder, make_engine, make_executor, make_scheduler, run_to_completion, tiny_kv_cache, watch

PLUGINS = create_plugin_manager(autoload=False)


def sim_engine(**settings) -> SimModelEngine:
    return make_engine(SimModelEngine, SimEngineConfig(**settings))


def sim_executor(engine, scenario=conformance.TIGHT, capacity="max_utilization", micro_batch="fcfs", kv_cache="paged", max_tokens=64, drafter=None):
    budgets = scenario.budgets
    return make_executor(
        engine=engine,
        capacity=make_scheduler(PLUGINS["capacity_scheduler"].get(capacity).load(), **budgets),
        micro_batch=make_scheduler(PLUGINS["micro_batch_scheduler"].get(micro_batch).load(), **budgets),
        kv_cache=tiny_kv_cache(max_tokens, factory=PLUGINS["kv_cache_manager"].get(kv_cache).load(), spec=engine.kv_cache_spec()),
        decoder=make_decoder("framework.decoder.sampling:SamplingDecoder"),  # the default decoder
        drafter=drafter,
        **budgets,
    )


COMBINATIONS = [
    (capacity, micro_batch, kv, scenario)
    for capacity in PLUGINS["capacity_scheduler"].names()
    for micro_batch in PLUGINS["micro_batch_scheduler"].names()
    for kv in PLUGINS["kv_cache_manager"].names()
    for scenario in conformance.SCENARIOS
]


@pytest.mark.parametrize("capacity, micro_batch, kv, scenario", COMBINATIONS)
def test_every_builtin_scheduler_and_kv_cache_runs_conforming_on_the_sim_engine(capacity, micro_batch, kv, scenario):
    """The conformance contracts (answers well formed, budgets kept, every request finished with
    all its tokens, the pool full again) hold with the sim engine in place of the fake one, on
    block accounting without tensors; and the clock moved by exactly the predicted steps."""
    engine = sim_engine()
    settings = conformance.SCENARIOS[scenario]
    drafter = OracleDrafter(lambda context: engine.token_id, engine.vocab_size) if settings.drafts else None
    executor = sim_executor(engine, settings, capacity, micro_batch, kv, drafter=drafter)
    assert executor.kv_cache_manager.get_kv_caches()[0][0].device.type == "meta"
    predicted = []

    def predict(scheduled, resource_manager):
        predicted.append(engine.cost_model.step_seconds(StepShape.of(scheduled)))
        return lambda output: None

    requests = conformance.workload(settings.seed, vocab=engine.vocab_size)
    with watch(engine, "forward", predict):
        conformance.run_conforming(executor, settings, requests, greedy=False)
    assert all(t == engine.token_id for r in requests for t in r.output_token_ids)
    assert engine.clock.now() == pytest.approx(sum(predicted)) and sum(predicted) > 0


def poisson_run(seed: int = 0, n: int = 30) -> list[tuple]:
    """A replay-like loop on a virtual clock: arrivals at exponential gaps, stamped on the engine's
    clock; returns each request's (arrival, first token, finish) and the preemptions."""
    engine = sim_engine()
    executor = sim_executor(engine, conformance.Scenario(8, 64), max_tokens=512)
    rng, clock, t = random.Random(seed), engine.clock, 0.0
    arrivals = []
    for i in range(n):
        t += rng.expovariate(2000.0)
        params = SamplingParams(max_tokens=rng.randrange(1, 40), temperature=0.0, ignore_eos=True)
        arrivals.append((t, LlmRequest(str(i), [rng.randrange(3, 500) for _ in range(rng.randrange(1, 80))], params, arrival_time=t)))
    pending = list(arrivals)
    while pending or executor.has_work():
        while pending and pending[0][0] <= clock.now():
            executor.enqueue(pending.pop(0)[1])
        if executor.has_work():
            executor.step()
        else:
            clock.sleep_until(pending[0][0])
    return [(r.arrival_time, r.first_token_time, r.finish_time, r.num_preemptions) for _, r in arrivals]


def test_virtual_clock_runs_are_deterministic():
    first, second = poisson_run(), poisson_run()
    assert first == second
    assert all(arrival < first_token <= finish for arrival, first_token, finish, _ in first)
    assert len({finish for _, _, finish, _ in first}) > 5  # requests finished at many different times
    assert poisson_run(seed=1) != first


def test_the_clock_follows_the_setting():
    assert isinstance(sim_engine().clock, VirtualClock)
    assert isinstance(sim_engine(clock="wall").clock, WallClock)
    with pytest.raises(ValueError, match="engine.clock"):
        sim_engine(clock="sundial")


def _run(engine, *requests, max_tokens=256):
    executor = sim_executor(engine, conformance.Scenario(8, 256), max_tokens=max_tokens)
    run_to_completion(executor, list(requests))
    return requests


def test_plain_requests_end_with_eos_after_eos_after_tokens():
    engine = sim_engine(eos_after=6)
    eos = (2,)
    plain = LlmRequest("plain", [5, 6, 7], SamplingParams(max_tokens=50, temperature=0.0), eos_token_ids=eos)
    sampled = LlmRequest("sampled", [5, 6, 8], SamplingParams(max_tokens=50, temperature=1.5, top_p=0.9), eos_token_ids=eos)
    ignoring = LlmRequest("ignoring", [5, 6, 9], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), eos_token_ids=eos)
    held = LlmRequest("held", [5, 6, 10], SamplingParams(max_tokens=50, min_tokens=9, temperature=0.0), eos_token_ids=eos)
    _run(engine, plain, sampled, ignoring, held)
    token = engine.token_id
    for request in (plain, sampled):
        assert request.output_token_ids == [token] * 5 + [2] and request.finish_reason is FinishReason.STOP
    assert ignoring.output_token_ids == [token] * 20 and ignoring.finish_reason is FinishReason.LENGTH
    assert held.output_token_ids == [token] * 9 + [2]  # the min_tokens mask hid EOS until then


def test_requests_that_read_the_vocabulary_get_full_rows_and_the_same_tokens():
    engine = sim_engine()

    def request(name, **params):
        return LlmRequest(name, [5, 6, len(name)], SamplingParams(max_tokens=4, ignore_eos=True, **{"temperature": 0.0, **params}))

    alone = request("alone")
    narrow, penalised = request("narrow"), request("penalised", repetition_penalty=1.3, temperature=0.7)
    with_logprobs = request("logprobs", logprobs=3, prompt_logprobs=2)
    widths = []
    with watch(engine, "forward", lambda scheduled, rm: lambda out: widths.append(out.logits.shape[1])):
        _run(engine, alone)
        steps_alone = len(widths)
        _run(engine, narrow, penalised, with_logprobs)
    assert set(widths[:steps_alone]) == {engine.token_id + 1}
    assert set(widths[steps_alone:]) == {engine.vocab_size}
    for r in (alone, narrow, penalised, with_logprobs):
        assert r.output_token_ids == [engine.token_id] * 4
    assert len(with_logprobs.logprobs) == 4 and with_logprobs.logprobs[0][engine.token_id][1] == 1  # (logprob, rank)
    assert len(with_logprobs.prompt_logprobs) == 3


def test_the_placeholder_token_is_the_first_that_is_not_special(smol_dir):
    from framework.models.checkpoint import load_hf_config

    assert first_plain_token(smol_dir, load_hf_config(smol_dir)) == 17  # after SmolLM2's 17 special tokens
    with pytest.raises(ValueError, match="token_id"):
        sim_engine(token_id=10**6)


def test_a_profile_of_another_model_is_refused(tmp_path):
    from framework.sim.model_shape import ModelShape
    from framework.sim.step_profile import StepProfile

    other = ModelShape(4, 8, 16, 2, 2, 4, 512)
    path = tmp_path / "other.json"
    StepProfile(other, "cpu", "float32", 10**9, [(StepShape(1, 1, 1, 1, 1), 0.01), (StepShape(8, 1, 36, 8, 1), 0.02)]).fitted().save(path)
    with pytest.raises(ValueError, match="another model"):
        sim_engine(profile=str(path))
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a profile"):
        sim_engine(profile=str(path))
