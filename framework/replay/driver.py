"""One loop drives a replay on one engine or a simulated cluster of several, on wall or virtual
clocks alike: a small discrete-event simulation.

Each replica is an `LLM` whose engine keeps a clock. A replica with work is due at its clock's
time (elapsed since the replay began); the next request is due at its arrival. The loop takes the
earliest: an arrival is routed to a replica (an idle replica behind the arrival first waits until
it: a wall clock sleeps, a virtual one jumps), otherwise the due replica runs one step (its forward
advances a virtual clock by the step's predicted time). Every token is stamped with its replica's
clock after the step that made it. With one wall-clock engine this is the usual benchmark loop:
submit what has arrived, step while there is work, else sleep until the next arrival.

A step starts only before the next arrival, but may end after it: the router then sees that replica
as its last step left it, at most one step ahead of the arrival. A virtual clock is told when that
arrival is due (its horizon), so a simulated engine may fold the steps before it into one
(`framework/sim/decode_runs.py`); each token is then stamped with the end of its own step.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from framework.engine.clock import VirtualClock
from framework.replay.statistics import RequestTiming
from framework.replay.workload import ReplayRequest
from framework.router.base import ReplicaLoad, Router
from framework.sampling_params import SamplingParams

MAX_IDLE_STEPS = 1000  # steps in a row that neither move a virtual clock nor produce a token


@dataclass
class Timeline:
    """A replica's state after each of its steps."""

    time: list[float] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    kv_cache_usage: list[float] = field(default_factory=list)

    def thinned(self, most: int) -> dict:
        """The timeline as lists, every k-th step kept so that at most `most` remain."""
        every = max(1, -(-len(self.time) // most))
        return {name: values[::every] for name, values in vars(self).items()}


@dataclass
class ReplayResult:
    timings: list[RequestTiming]  # one per request, in arrival order
    duration: float  # seconds from the start to the last finish
    timelines: list[Timeline]  # one per replica
    prefix_hit_rate: float | None  # over the replay's prompts (None: nothing was looked up)


class Replica:
    def __init__(self, index: int, llm):
        self.index, self.llm = index, llm
        self.origin = llm.clock.now()
        self.timeline = Timeline()
        stats = llm.kv_cache_stats
        self.prefix_at_start = (stats.prefix_queried_tokens, stats.prefix_hit_tokens)

    def elapsed(self) -> float:
        return self.llm.clock.now() - self.origin

    def busy(self) -> bool:
        return self.llm.has_unfinished_requests()

    def load(self) -> ReplicaLoad:
        executor = self.llm.executor
        return ReplicaLoad(self.index, executor.num_running(), executor.num_waiting(), self.llm.kv_cache_stats.usage)

    def record(self, now: float) -> None:
        load, line = self.load(), self.timeline
        line.time.append(now)
        line.running.append(load.num_running)
        line.waiting.append(load.num_waiting)
        line.kv_cache_usage.append(load.kv_cache_usage)


def check_clocks(llms, replicas: int | None = None) -> None:
    """Several replicas (`replicas`, default one per llm) share one simulated timeline: each
    needs a virtual clock of its own."""
    replicas = len(llms) if replicas is None else replicas
    if replicas < 2:
        return
    clocks = [llm.clock for llm in llms]
    if not all(isinstance(clock, VirtualClock) for clock in clocks):
        raise ValueError(
            f"replay.replicas={replicas} needs engines on virtual clocks (a simulated engine, such as engine=sim); "
            f"engine {llms[0].config.engine.name!r} runs in wall-clock time, so run it with replay.replicas=1"
        )
    if len({id(clock) for clock in clocks}) < len(clocks):
        raise ValueError("the replicas' engines share one clock object; each replica needs a clock of its own")


def timings_for(requests: list[ReplayRequest]) -> list[RequestTiming]:
    """An empty timing per request, keeping who sent it, for the statistics to cut by."""
    return [RequestTiming(r.arrival, len(r.prompt_token_ids), tenant=r.tenant, priority=r.priority) for r in requests]


def replay(llms, requests: list[ReplayRequest], router: Router, progress: bool = True, ttft_slo_ms: float | None = None) -> ReplayResult:
    """Run `requests` (in arrival order) through the replicas `llms`, `router` choosing one for each;
    each request carries `ttft_slo_ms` as its deadline (the SLO goodput counts against), for
    schedulers that read one."""
    from tqdm.auto import tqdm

    check_clocks(llms)
    replicas = [Replica(i, llm) for i, llm in enumerate(llms)]
    timings = timings_for(requests)
    pending = deque(enumerate(requests))
    # a router that reads no load routes every request now (the same choices as at each arrival),
    # so a simulated replica may run on through arrivals that go elsewhere
    routes = None if router.reads_loads else _routes_ahead(router, requests, replicas)
    upcoming = [deque(r.arrival for r, to in zip(requests, routes) if to == i) for i in range(len(replicas))] if routes else None
    idle_steps = 0
    with tqdm(total=len(requests), desc="Replaying", unit="req", disable=not progress) as bar:
        while True:
            busy = [r for r in replicas if r.busy()]
            due = min(busy, key=lambda r: (r.elapsed(), r.index)) if busy else None
            if pending and (due is None or pending[0][1].arrival <= due.elapsed()):
                index, request = pending.popleft()
                if routes:
                    chosen = replicas[routes[index]]
                    upcoming[chosen.index].popleft()
                else:
                    chosen = replicas[router.route(request.prompt_token_ids, [r.load() for r in replicas])]
                if not _submit(chosen, index, request, timings[index], ttft_slo_ms):
                    bar.update(1)
            elif due is not None:
                if isinstance(due.llm.clock, VirtualClock):
                    due.llm.clock.horizon = due.origin + _next_arrival(due, pending, upcoming)
                before = due.elapsed()
                finished, produced = _step(due, timings)
                bar.update(finished)
                progressed = produced or due.elapsed() > before or not isinstance(due.llm.clock, VirtualClock)
                idle_steps = 0 if progressed else idle_steps + 1
                if idle_steps >= MAX_IDLE_STEPS:
                    raise RuntimeError(f"replica {due.index} stepped {MAX_IDLE_STEPS} times without a token or any time passing")
            else:
                break
    return ReplayResult(timings, run_duration(timings, requests), [r.timeline for r in replicas], _prefix_hit_rate(replicas))


def _routes_ahead(router: Router, requests: list[ReplayRequest], replicas: list[Replica]) -> list[int]:
    """The replica of every request, from a router that reads no load (given the loads at the start)."""
    loads = [r.load() for r in replicas]
    return [router.route(r.prompt_token_ids, loads) for r in requests]


def _next_arrival(replica: Replica, pending, upcoming) -> float:
    """When the next request that may change what `replica` does arrives: the next one routed to
    it where routes are known ahead (`upcoming`), else the next one; inf: none."""
    if upcoming is not None:
        return upcoming[replica.index][0] if upcoming[replica.index] else math.inf
    return pending[0][1].arrival if pending else math.inf


def run_duration(timings: list[RequestTiming], requests: list[ReplayRequest]) -> float:
    """Seconds from the start to the last finish (or the last arrival, if later)."""
    return max([t.finish for t in timings if t.finish is not None] + [r.arrival for r in requests], default=0.0)


def _submit(chosen: Replica, index: int, request: ReplayRequest, timing: RequestTiming, ttft_slo_ms=None) -> bool:
    """Hand `request` to the replica the router chose; False when the engine refused it."""
    chosen.llm.clock.sleep_until(chosen.origin + request.arrival)
    params = SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=0.0, detokenize=False)
    try:
        chosen.llm.add_request(
            request.prompt_token_ids, params, request_id=str(index), arrival_time=chosen.origin + request.arrival,
            priority=request.priority, tenant=request.tenant, ttft_slo_ms=ttft_slo_ms,
        )
    except ValueError as exc:
        timing.error = str(exc)
        return False
    return True


def _step(replica: Replica, timings: list[RequestTiming]) -> tuple[int, bool]:
    """One step of `replica`: stamp the tokens it made; returns (requests finished, any output)."""
    outputs = replica.llm.step()
    now = replica.elapsed()
    run_ends = [end - replica.origin for end in getattr(replica.llm.executor.model_engine, "run_step_ends", ())]
    finished = 0
    for out in outputs:
        timing = timings[int(out.request_id)]
        new = len(out.outputs[0].token_ids) - timing.output_tokens
        if run_ends:  # a decode run: its n-th token came at the end of its n-th step
            timing.add_token_times(run_ends[:new])
        else:
            timing.add_tokens(new, now)
        if out.finished:
            finished += 1
            timing.finish = timing.token_times[-1] if run_ends and timing.token_times else now
            timing.preemptions = out.metrics.get("num_preemptions", 0)
            timing.error = out.error
    replica.record(now)
    return finished, bool(outputs)


def _prefix_hit_rate(replicas: list[Replica]) -> float | None:
    queried = hit = 0
    for replica in replicas:
        stats = replica.llm.kv_cache_stats
        queried += stats.prefix_queried_tokens - replica.prefix_at_start[0]
        hit += stats.prefix_hit_tokens - replica.prefix_at_start[1]
    return hit / queried if queried else None
