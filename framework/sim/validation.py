"""`profile.validate_loads`: the profile checks itself against the real engine.

Once the cost model is fitted, the real engine serves a workload the fit never saw (the `replay`
config's requests after the serving runs' first `profile.serving_requests`, drawn with seed
`profile.seed + 1`: a trace's next requests; Poisson arrivals at each load, a fraction of the
capacity the serving runs measured), and then a simulated engine on the fitted model serves
the same requests at the same arrivals, with the same schedulers and KV cache settings. Both run
in one process minutes apart, so the comparison sees the machine at one speed: on a VM whose speed
wanders between processes this is the only comparison that measures the cost model rather than
the VM (docs/simulator.md).

A machine can also change speed within minutes, so each real run's steps are timed too and priced
by the cost model: their error says how far the steps were mispriced, and a second simulation at
the speed the real run's steps had (the model's times scaled by one factor, real over priced)
shows what is left once the steps are priced right: the error of the scheduling, batching and
queueing the simulation reproduces.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
from omegaconf import OmegaConf

from framework.replay.arrivals import arrival_times
from framework.replay.driver import replay
from framework.replay.statistics import summarize
from framework.replay.workload import build_workload
from framework.router.round_robin import RoundRobinRouter
from framework.sim.cost_model import CostModel
from framework.sim.serving_runs import TimedSteps

COMPARED = ("ttft_ms", "tpot_ms", "e2e_ms")  # each compared at its mean and p90
STATS = ("mean", "p90")


class ScaledCost(CostModel):
    """`model`'s step times multiplied by `factor`."""

    def __init__(self, model: CostModel, factor: float):
        self.model, self.factor, self.is_prediction = model, factor, model.is_prediction

    def step_seconds(self, shape) -> float:
        return self.factor * self.model.step_seconds(shape)

    def decode_steps_seconds(self, batch: int, contexts) -> list[float]:
        return [self.factor * seconds for seconds in self.model.decode_steps_seconds(batch, contexts)]

    def describe(self) -> str:
        return f"{self.model.describe()}, times {self.factor:.3f}"


def simulated_twin(llm, profile_path: str):
    """An LLM on `engine=sim` over the profile at `profile_path`, with `llm`'s every other setting."""
    from framework.api.llm import LLM
    from framework.config import compose

    sim_engine = compose(["engine=sim", f"engine.profile={profile_path}", "engine.clock=virtual"], llm.plugins).engine
    config = copy.deepcopy(llm.config)
    config.engine = sim_engine
    return LLM(config=config, plugins=llm.plugins)


def validate(llm, settings, capacity: float, profile_path: str, progress=lambda line: None) -> list[dict]:
    """One comparison per load in `settings.validate_loads` (the `profile` config): the real
    `llm` against a simulated twin on the profile at `profile_path`."""
    from framework.replay.runner import prompt_token_ids
    from framework.sim.profiler import StepProfiler

    if not settings.validate_loads:
        return []
    if capacity <= 0:
        raise ValueError("profile.validate_loads are fractions of the capacity the serving runs measure; set profile.serving_requests > 0")
    seed, n = settings.seed + 1, settings.serving_requests
    # the workload's requests after the first n, which a trace gives the serving runs too
    workload_config = OmegaConf.merge(llm.config.replay, {"num_requests": 2 * n, "seed": seed})
    requests = build_workload(workload_config, prompt_token_ids(llm, workload_config.vocab_size)).requests[n:]
    if not requests:
        raise ValueError(f"profile.validate_loads replays the workload's requests after the serving runs' first {n}; it has no more")
    timed_step = StepProfiler(llm, settings).timed
    twin = simulated_twin(llm, profile_path)
    sim_engine = twin.executor.model_engine
    fitted = sim_engine.cost_model
    rng = np.random.default_rng(seed)
    rows = []
    for load in settings.validate_loads:
        rate = load * capacity
        arrivals = arrival_times(len(requests), rate, "poisson", 1.0, rng).tolist()
        timed = [replace(r, arrival=t) for r, t in zip(requests, arrivals)]
        timed_llm = TimedSteps(llm, timed_step)
        real = _served(timed_llm, timed)
        steps = step_error(fitted, timed_llm.samples)
        simulated = _served(twin, timed)
        sim_engine.cost_model = ScaledCost(fitted, steps["real_s"] / steps["priced_s"])
        try:
            rescaled = _served(twin, timed)
        finally:
            sim_engine.cost_model = fitted
        rows.append(comparison(load, rate, real, simulated, rescaled, steps))
        progress(f"validation at {load:.0%} of capacity ({rate:.2f} req/s): {summary_line(rows[-1])}")
    return rows


def _served(llm, requests) -> dict:
    llm.executor.reset_prefix_cache()
    result = replay([llm], requests, RoundRobinRouter(), progress=False)
    return {**summarize(result.timings, result.duration), "prefix_hit_rate": result.prefix_hit_rate}


def step_error(model: CostModel, samples) -> dict:
    """The real steps' total seconds against what `model` prices them at."""
    real = sum(seconds for _, seconds in samples)
    priced = sum(model.step_seconds(shape) for shape, _ in samples)
    return {"count": len(samples), "real_s": real, "priced_s": priced, "error": priced / real - 1 if real else None}


def comparison(load: float, rate: float, real: dict, simulated: dict, rescaled: dict, steps: dict) -> dict:
    """Real and simulated figures side by side with the simulation's relative errors, as
    simulated and at the real steps' speed (`rescaled`)."""
    row = {"load": load, "rate": rate, "requests": real["requests"], "steps": steps}
    for metric in COMPARED:
        for stat in STATS:
            value = real[metric][stat]
            row[f"{metric}.{stat}"] = {
                "real": value,
                "simulated": simulated[metric][stat], "error": _error(value, simulated[metric][stat]),
                "rescaled": rescaled[metric][stat], "rescaled_error": _error(value, rescaled[metric][stat]),
            }
    for counted in ("preemptions", "prefix_hit_rate"):
        row[counted] = {"real": real.get(counted), "simulated": simulated.get(counted), "rescaled": rescaled.get(counted)}
    return row


def _error(real: float | None, simulated: float | None) -> float | None:
    return (simulated - real) / real if real and simulated is not None else None


def summary_line(row: dict) -> str:
    errors = ", ".join(f"{key} {row[key]['error']:+.0%}" for key in _compared_keys() if row[key]["error"] is not None)
    rescaled = ", ".join(f"{row[key]['rescaled_error']:+.0%}" for key in _compared_keys() if row[key]["rescaled_error"] is not None)
    steps = row["steps"]
    priced = f"{steps['error']:+.0%}" if steps["error"] is not None else "-"
    return f"{errors}; its {steps['count']} steps priced {priced}; at their speed {rescaled}"


def _compared_keys() -> list[str]:
    return [f"{metric}.{stat}" for metric in COMPARED for stat in STATS]


def format_validation(rows: list[dict]) -> str:
    """Two tables, real / simulated (error) per cell: as simulated, and at the real steps' speed."""
    return "\n".join([
        "real / simulated (error of the simulation):",
        _table(rows, "simulated", "error", with_steps=True),
        "the same, each real run's steps priced at the speed they ran (the model's times scaled by real over priced):",
        _table(rows, "rescaled", "rescaled_error", with_steps=False),
    ])


def _table(rows: list[dict], value: str, error: str, with_steps: bool) -> str:
    header = ["load", *(f"{metric.removesuffix('_ms').upper()} {stat} ms" for metric in COMPARED for stat in STATS), "preemptions", "prefix hits"]
    header += ["steps priced"] if with_steps else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['load']:.0%} ({row['rate']:.2f} req/s)"]
        for key in _compared_keys():
            pair = row[key]
            off = f" ({pair[error]:+.0%})" if pair[error] is not None else ""
            cells.append(f"{_number(pair['real'])} / {_number(pair[value])}{off}")
        cells.append(f"{row['preemptions']['real']} / {row['preemptions'][value]}")
        hits = row["prefix_hit_rate"]
        cells.append(f"{_percent(hits['real'])} / {_percent(hits[value])}")
        if with_steps:
            steps = row["steps"]
            cells.append(f"{steps['error']:+.0%} of {steps['count']}" if steps["error"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
