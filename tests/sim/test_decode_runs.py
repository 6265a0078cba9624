"""Runs of decode steps folded into one scheduler pass (`speculative=decode_runs`): a replay on the
sim engine times every request exactly as stepping one step at a time does (the same floats, not
close ones), in fewer steps, whatever stops a run: an arrival, a finish, the token budget, a pool
short of blocks (with preemptions), a scheduler that grants no drafts, EOS; under every built-in
capacity policy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from framework import LLM, SamplingParams
from framework.replay.driver import replay
from framework.replay.workload import ReplayRequest
from framework.router.least_loaded import LeastLoadedRouter
from framework.router.round_robin import RoundRobinRouter


def sim_llm(tiny_dir, runs: bool, **options) -> LLM:
    """A sim LLM whose runs may be as long and as wide as its step (what a replay sets)."""
    speculative = {"speculative": "decode_runs", "speculative.num_tokens": 4096, "speculative.max_batch_size": 256} if runs else {}
    return LLM(str(tiny_dir), engine="sim", **speculative, **options)


def workload(n: int = 40, rate: float = 40.0, seed: int = 0) -> list[ReplayRequest]:
    """Poisson arrivals of prompts of 8-200 tokens and outputs of 1-120 (on the H100 roofline a
    decode step of the tiny model is ~2 ms, so requests overlap and runs cross arrivals)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    return [
        ReplayRequest(float(t), rng.integers(100, 20000, int(rng.integers(8, 200))).tolist(), int(rng.integers(1, 120)))
        for t in arrivals
    ]


def timed(tiny_dir, runs: bool, replicas: int = 1, router=RoundRobinRouter, **options):
    """Each request's (token times, finish, preemptions, error) and the steps the replicas took."""
    llms = [sim_llm(tiny_dir, runs, **options) for _ in range(replicas)]
    result = replay(llms, workload(), router(), progress=False)
    timings = [(t.token_times, t.finish, t.preemptions, t.error) for t in result.timings]
    return timings, sum(llm.executor.num_steps for llm in llms), llms


CASES = {
    "one replica": dict(),
    "three replicas, routed ahead": dict(replicas=3),
    "three replicas, least loaded": dict(replicas=3, router=LeastLoadedRouter),
    "a small token budget": {"max_num_tokens": 24},
    "a short pool that preempts": {"kv_cache.max_tokens": 512, "kv_cache.block_size": 4, "scheduler.capacity": "max_utilization"},
    "a scheduler that grants no drafts": {"scheduler.micro_batch": "equal_progress"},
    "shortest job first": {"scheduler.capacity": "sjf"},
    "fair shares": {"scheduler.capacity": "fair"},
    "static batches": {"scheduler.capacity": "static_batch"},
}


@pytest.mark.parametrize("case", CASES)
def test_a_replay_times_every_request_as_one_step_at_a_time_does(tiny_dir, case):
    options = CASES[case]
    stepped, stepped_steps, _ = timed(tiny_dir, False, **options)
    folded, folded_steps, llms = timed(tiny_dir, True, **options)
    assert folded == stepped
    assert all(error is None for *_, error in folded) and all(len(times) for times, *_ in folded)
    if case == "a short pool that preempts":
        assert sum(p for _, _, p, _ in folded) > 0
    if case == "a scheduler that grants no drafts":  # (every run is cut back to one step)
        assert folded_steps == stepped_steps
    else:  # (a budget of 24 tokens, or a pool that runs short, holds short runs only)
        assert folded_steps < stepped_steps * (0.4 if case in ("one replica", "three replicas, routed ahead") else 0.95)
    for llm in llms:
        assert llm.kv_cache_stats.num_free_blocks == llm.kv_cache_stats.num_blocks


def generate(tiny_dir, runs: bool, params: list[SamplingParams]):
    llm = sim_llm(tiny_dir, runs)
    llm.clock.horizon = math.inf  # (nothing else arrives: what the replay driver says after the last arrival)
    outputs = llm.generate([[100 + i] * (5 + 7 * i) for i in range(len(params))], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.metrics["first_token_time"], o.metrics["finish_time"]) for o in outputs], llm


def test_requests_end_where_they_would_step_by_step(tiny_dir):
    """EOS (the sim's at its `eos_after`-th token), a stop token id that is the sim's own token,
    max_tokens and the model's length end requests at the same token and time."""
    probe = sim_llm(tiny_dir, False).executor.model_engine
    params = [
        SamplingParams(max_tokens=300),  # ends with EOS at token 128
        SamplingParams(max_tokens=300, stop_token_ids=[probe.token_id], min_tokens=3),  # masked thrice, then stops
        SamplingParams(max_tokens=40, ignore_eos=True),
        SamplingParams(max_tokens=200, ignore_eos=True, logprobs=2),
    ]
    stepped, stepped_llm = generate(tiny_dir, False, params)
    folded, folded_llm = generate(tiny_dir, True, params)
    assert folded == stepped
    assert [len(tokens) for tokens, *_ in folded] == [probe.eos_after, 4, 40, 200]
    assert folded_llm.executor.num_steps < stepped_llm.executor.num_steps / 4


def test_without_a_horizon_nothing_is_folded(tiny_dir):
    """Offline generation that nobody drives: requests may come from another thread at any time."""
    llm = sim_llm(tiny_dir, True)
    llm.generate([[100] * 9], SamplingParams(max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert llm.executor.num_steps == 30


def test_runs_are_as_long_and_as_wide_as_speculative_allows(tiny_dir):
    stepped = sim_llm(tiny_dir, False)
    capped = LLM(str(tiny_dir), engine="sim", speculative="decode_runs", **{"speculative.num_tokens": 9, "speculative.max_batch_size": 2})
    for llm in stepped, capped:
        llm.clock.horizon = math.inf
        llm.generate([[100] * 5, [200] * 9, [300] * 7], SamplingParams(max_tokens=41, ignore_eos=True), use_tqdm=False)
        llm.generate([[100] * 5], SamplingParams(max_tokens=41, ignore_eos=True), use_tqdm=False)
    # three requests: no runs (a prefill step, then 40 decode steps); one: a prefill, then runs of 10
    assert (stepped.executor.num_steps, capped.executor.num_steps) == (41 + 41, 41 + 1 + 4)


def test_on_another_engine_decode_runs_warn_and_fold_nothing(tiny_dir, caplog):
    llm = LLM(str(tiny_dir), speculative="decode_runs", **{"speculative.num_tokens": 64})
    llm.generate([[100] * 9], SamplingParams(max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert llm.executor.num_steps == 30 and "folds simulated steps only" in caplog.text


def test_a_replay_on_the_sim_engine_folds_runs_unless_told_not_to(tmp_path, tiny_dir, capsys):
    from framework.config import compose
    from framework.plugins.manager import create_plugin_manager
    from framework.replay.runner import run_replay

    common = [f"model.path={tiny_dir}", "mode=replay", "replay.num_requests=12", "replay.rate=20", "replay.progress=false"]
    steps = {}
    plugins = create_plugin_manager()
    for runs in ("true", "false"):
        overrides = [*common, "engine=sim", f"replay.decode_runs={runs}"]
        document = run_replay(compose(overrides, plugins), plugins, tmp_path / runs, overrides)
        steps[runs] = (document["setup"]["steps"], document["requests"])
    assert steps["true"][1] == steps["false"][1] and steps["true"][0] < steps["false"][0]
    assert "x real time" in capsys.readouterr().out
