"""`mode=replay` in-process: the driver on virtual clocks (a FakeEngine whose forward advances
its own clock by a fixed amount, so every time below is computed by hand), a simulated cluster,
and a tiny real model end to end."""

import dataclasses
import json

import numpy as np
import pytest

from framework import LLM, SamplingParams
from framework.config import ReplayConfig, compose
from framework.plugins.hookspecs import hookimpl
from framework.plugins.manager import create_plugin_manager
from framework.replay.driver import replay
from framework.replay.figures import common_key, configuration_labels, describe_workload, request_rate
from framework.replay.report import read_reports
from framework.replay.runner import run_replay
from framework.replay.statistics import summarize
from framework.replay.sweep import SweepFigure
from framework.replay.workload import ReplayRequest, build_workload
from framework.router.round_robin import RoundRobinRouter
from framework.testing import FakeEngine

STEP_S, TOKEN_S = 0.5, 1 / 16  # each forward: half a second plus 1/16 s per computed token


class VirtualEngines:
    @hookimpl
    def register_model_engines(self, register):
        register("virtual_fake", lambda *args: FakeEngine(seconds_per_step=STEP_S, seconds_per_token=TOKEN_S))
        register("wall_fake", lambda *args: FakeEngine())


PLUGINS = create_plugin_manager([VirtualEngines()], autoload=False)
KV = {"kv_cache.max_tokens": 1024, "kv_cache.block_size": 4}


def virtual_llm(tiny_dir, engine="virtual_fake", **options):
    return LLM(str(tiny_dir), plugins=PLUGINS, engine=engine, **{**KV, **options})


def request(arrival, prompt_len=8, output_len=3, first=1000):
    return ReplayRequest(arrival, list(range(first, first + prompt_len)), output_len)


# ---- stepping an LLM by hand -------------------------------------------------------------------
def test_add_request_and_step(tiny_dir):
    llm = virtual_llm(tiny_dir)
    params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0)
    assert llm.add_request([5, 6, 7], params, request_id="a", arrival_time=-1.0) == "a"
    assert llm.has_unfinished_requests()
    first = llm.step()
    assert [(o.request_id, len(o.outputs[0].token_ids), o.finished) for o in first] == [("a", 1, False)]
    assert first[0].metrics["arrival_time"] == -1.0 and first[0].metrics["first_token_time"] == STEP_S + 3 * TOKEN_S
    second = llm.step()
    assert second[0].finished and second[0].outputs[0].token_ids == llm.executor.model_engine.greedy([5, 6, 7], 2)
    assert not llm.has_unfinished_requests() and llm.step() == []
    with pytest.raises(ValueError, match="prompt: the prompt is empty"):
        llm.add_request([], params)


def test_requests_arrive_on_the_engine_clock(tiny_dir):
    llm = virtual_llm(tiny_dir)
    llm.clock.advance(7.0)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)[0]
    assert out.metrics["arrival_time"] == 7.0 and out.metrics["first_token_time"] == 7.0 + STEP_S + 3 * TOKEN_S


def test_stepping_by_hand_is_refused_while_the_background_loop_runs(tiny_dir):
    llm = virtual_llm(tiny_dir)
    llm.start()
    try:
        with pytest.raises(RuntimeError, match="background loop is running"):
            llm.step()
    finally:
        llm.shutdown()


# ---- the driver on virtual clocks --------------------------------------------------------------
def test_virtual_times_by_hand(tiny_dir):
    """a arrives at 0: its prompt step ends at 0.5 + 8/16 = 1.0, then decode steps of one token
    each take 0.5625. b arrives at 0.25, during a's prompt step: it waits for the next step,
    which computes b's 8 prompt tokens beside a's decode token. c arrives at 10, long after both
    finished: the idle clock jumps to 10."""
    result = replay([virtual_llm(tiny_dir)], [request(0.0), request(0.25, first=2000), request(10.0, first=3000)], RoundRobinRouter(), progress=False)
    a, b, c = result.timings
    step2 = 1.0 + STEP_S + 9 * TOKEN_S  # a's decode + b's prompt: 2.0625
    step3 = step2 + STEP_S + 2 * TOKEN_S  # both decode: 2.6875
    assert a.token_times == [1.0, step2, step3]
    assert b.token_times == [step2, step3, step3 + STEP_S + TOKEN_S]
    assert (b.ttft, b.arrival) == (step2 - 0.25, 0.25)
    assert c.token_times == [11.0, 11.5625, 12.125] and c.ttft == 1.0
    assert result.duration == 12.125
    assert result.timelines[0].time[0] == 1.0 and result.timelines[0].running[:4] == [1, 2, 1, 0]  # a finished in step 3, b in 4


def workload(n=24, seed=0):
    cfg = ReplayConfig(num_requests=n, rate=6.0, seed=seed)
    cfg.input.dist, cfg.input.min, cfg.input.max = "uniform", 4, 40
    cfg.output.dist, cfg.output.min, cfg.output.max = "uniform", 1, 12
    return build_workload(cfg, np.arange(100, 5000)).requests


def timings_of(tiny_dir, replicas=1, router=None, **options):
    llms = [virtual_llm(tiny_dir, **options) for _ in range(replicas)]
    result = replay(llms, workload(), router or RoundRobinRouter(), progress=False)
    return [(t.arrival, t.token_times, t.output_tokens, t.preemptions, t.error) for t in result.timings]


def test_seeded_virtual_runs_repeat_exactly(tiny_dir):
    tight = {"scheduler": "max_utilization", "kv_cache.max_tokens": 96}  # preempts
    once, again = timings_of(tiny_dir, **tight), timings_of(tiny_dir, **tight)
    assert once == again
    assert sum(t[3] for t in once) > 0, "the tight pool should preempt"
    assert all(t[4] is None and t[2] == r.output_len for t, r in zip(once, workload()))


def test_a_cluster_steps_its_replicas_in_parallel_time(tiny_dir):
    """Four requests at once: one replica computes their 32 prompt tokens in one step (0.5 + 2 s);
    two replicas each compute 16 (0.5 + 1 s), side by side."""
    four = [request(0.0, first=1000 + 100 * i, output_len=1) for i in range(4)]
    one = replay([virtual_llm(tiny_dir)], four, RoundRobinRouter(), progress=False)
    two = replay([virtual_llm(tiny_dir) for _ in range(2)], four, RoundRobinRouter(), progress=False)
    assert [t.ttft for t in one.timings] == [2.5] * 4
    assert [t.ttft for t in two.timings] == [1.5] * 4
    assert [len(line.time) for line in two.timelines] == [1, 1]
    assert two.duration == 1.5


def test_a_cluster_run_repeats_exactly(tiny_dir):
    from framework.router.least_loaded import LeastLoadedRouter

    assert timings_of(tiny_dir, replicas=3, router=LeastLoadedRouter()) == timings_of(tiny_dir, replicas=3, router=LeastLoadedRouter())


def test_wall_clock_engines_cannot_form_a_cluster(tiny_dir):
    with pytest.raises(ValueError, match="replay.replicas=2 needs engines on virtual clocks"):
        replay([virtual_llm(tiny_dir, engine="wall_fake") for _ in range(2)], [request(0.0)], RoundRobinRouter(), progress=False)
    shared = virtual_llm(tiny_dir)
    other = virtual_llm(tiny_dir)
    other.executor.model_engine.clock = shared.clock
    with pytest.raises(ValueError, match="share one clock"):
        replay([shared, other], [request(0.0)], RoundRobinRouter(), progress=False)


@pytest.mark.parametrize("scheduler, order", [("fcfs", ["a0", "a1", "a2", "b0"]), ("fair", ["a0", "b0", "a1", "a2"])])
def test_tenants_reach_the_scheduler(tiny_dir, scheduler, order):
    """One request at a time: fcfs serves in arrival order; fair serves tenant b's one request
    as soon as a's first is done, since b's counter is then the lower."""
    names = ["a0", "a1", "a2", "b0"]
    requests = [dataclasses.replace(request(0.0, first=1000 + 100 * i), tenant=name[0]) for i, name in enumerate(names)]
    result = replay([virtual_llm(tiny_dir, scheduler=scheduler, **{"scheduler.max_batch_size": 1})], requests, RoundRobinRouter(), progress=False)
    assert [name for _, name in sorted(zip((t.ttft for t in result.timings), names))] == order
    assert [t.tenant for t in result.timings] == ["a", "a", "a", "b"]


def test_the_ttft_slo_reaches_each_request(tiny_dir, monkeypatch):
    llm = virtual_llm(tiny_dir)
    seen = []
    add = type(llm).add_request
    monkeypatch.setattr(type(llm), "add_request", lambda self, *args, **kw: seen.append(kw["ttft_slo_ms"]) or add(self, *args, **kw))
    replay([llm], [request(0.0), request(0.5)], RoundRobinRouter(), progress=False, ttft_slo_ms=250.0)
    assert seen == [250.0, 250.0]


def test_a_refused_request_counts_as_failed(tiny_dir):
    too_long = request(0.5, prompt_len=300)  # FakeEngine's max_model_len is 256
    result = replay([virtual_llm(tiny_dir)], [request(0.0), too_long], RoundRobinRouter(), progress=False)
    assert "maximum length is 256" in result.timings[1].error
    stats = summarize(result.timings, result.duration)
    assert (stats["completed"], stats["failed"]) == (1, 1)


# ---- mode=replay: runner, report, figure, sweep -------------------------------------------------
MOONCAKE = [  # three conversations of two turns; a second turn repeats its first turn's blocks
    {"timestamp": 100 * i, "input_length": 1024 + 512 * (i // 3), "output_length": 128, "hash_ids": [10 * (i % 3), 10 * (i % 3) + 1] + [1000 + i] * (i // 3)}
    for i in range(6)
]


def run(tmp_path, tiny_dir, name, *overrides):
    cfg = compose([f"model.path={tiny_dir}", "mode=replay", "replay.progress=false", *overrides], PLUGINS)
    return run_replay(cfg, PLUGINS, tmp_path / name, list(overrides))


def test_prefix_affinity_keeps_conversations_where_their_cache_is(tmp_path, tiny_dir):
    trace = tmp_path / "conversations.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in MOONCAKE))
    common = ["engine=virtual_fake", f"replay.trace={trace}", "replay.length_scale=0.0625", "replay.replicas=2", *(f"{k}={v}" for k, v in KV.items())]
    hit = {router: run(tmp_path, tiny_dir, router, *common, f"replay.router={router}")["statistics"]["prefix_hit_rate"] for router in ("round_robin", "prefix_affinity")}
    # round robin sends request i to replica i % 2, so every second turn (i = 3, 4, 5) lands on the
    # other replica than its first turn (i - 3)
    assert hit["round_robin"] == 0.0
    assert hit["prefix_affinity"] > 0.3  # the second turns' two shared blocks of three


def test_tiny_model_end_to_end(tmp_path, tiny_dir, capsys):
    overrides = ["replay.num_requests=6", "replay.rate=50", "replay.input.value=12", "replay.output.value=4", "replay.slo.ttft_ms=60000", "kv_cache.max_tokens=512", "model.dtype=float32"]
    document = run(tmp_path, tiny_dir, "run", *overrides)
    printed = capsys.readouterr().out
    assert "6 completed, 0 failed" in printed and "TTFT" in printed
    saved = json.loads((tmp_path / "run" / "replay.json").read_text())
    assert saved["statistics"] == document["statistics"]
    s = saved["statistics"]
    assert (s["completed"], s["output_tokens"], s["slo"]["met"]) == (6, 24, 6)
    assert s["ttft_ms"]["p50"] > 0 and s["goodput"] == s["request_throughput"]
    assert s["peak_waiting"] >= 0 and 0 < s["peak_kv_cache_usage"] <= 1
    assert saved["setup"]["engine"] == "pytorch" and saved["setup"]["clock"] == "WallClock"
    assert len(saved["requests"]) == 6 and saved["timelines"][0]["running"]
    assert (tmp_path / "run" / "replay.png").stat().st_size > 0


def test_sweep_figure_after_a_multirun(tmp_path, tiny_dir):
    from omegaconf import OmegaConf

    for i, (scheduler, rate) in enumerate([("fcfs", 2), ("fcfs", 8), ("max_utilization", 2), ("max_utilization", 8)]):
        run(tmp_path / "sweep", tiny_dir, str(i), "mode=replay", f"scheduler={scheduler}", f"replay.rate={rate}", "engine=virtual_fake", "replay.num_requests=8", *(f"{k}={v}" for k, v in KV.items()))
    sweep = {"mode": "replay", "replay": {"out": None}, "hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}
    SweepFigure().on_multirun_end(OmegaConf.create(sweep))
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    documents = read_reports(tmp_path / "sweep")
    assert sorted(zip(configuration_labels(documents), map(request_rate, documents))) == [
        ("scheduler=fcfs", 2), ("scheduler=fcfs", 8), ("scheduler=max_utilization", 2), ("scheduler=max_utilization", 8),
    ]
    assert describe_workload(documents) == "arrivals poisson; input fixed 128; output fixed 64"


def test_a_sweep_of_schedulers_draws_them_side_by_side(tmp_path, tiny_dir):
    from omegaconf import OmegaConf

    tenants = "replay.tenants=[{name:flood,share:3,priority:1},{name:chat,priority:0}]"
    for scheduler in ("fcfs", "fair"):
        common = ["engine=virtual_fake", tenants, "replay.num_requests=12", "replay.rate=8", "scheduler.max_batch_size=2", *(f"{k}={v}" for k, v in KV.items())]
        run(tmp_path / "sweep", tiny_dir, scheduler, f"scheduler={scheduler}", *common)
    sweep = {"mode": "replay", "replay": {"out": None}, "hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}
    SweepFigure().on_multirun_end(OmegaConf.create(sweep))
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    documents = read_reports(tmp_path / "sweep")
    assert configuration_labels(documents) == ["scheduler=fair", "scheduler=fcfs"]
    assert common_key(configuration_labels(documents)) == ("scheduler", ["fair", "fcfs"])  # the bars' ticks
    assert common_key(["scheduler=fcfs kv_cache.block_size=8", "scheduler=sjf"])[0] == ""
    assert "tenants flood 75% (priority 1), chat 25% (priority 0)" in describe_workload(documents)
    for document in documents:
        senders = [(r["tenant"], r["priority"]) for r in document["requests"]]
        assert set(senders) == {("flood", 1), ("chat", 0)}
        tenants_stats = document["statistics"]["tenants"]
        assert sum(tenants_stats[name]["requests"] for name in ("flood", "chat")) == 12
        assert set(document["statistics"]["priorities"]) == {"0", "1"}


def test_the_sweep_callback_is_configured():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).parents[2] / "conf" / "config.yaml")
    assert conf.hydra.callbacks.replay_sweep._target_ == "framework.replay.sweep.SweepFigure"
