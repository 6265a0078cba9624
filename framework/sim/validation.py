"""`profile.validate_loads`: the profile checks itself against the real engine.

Once the cost model is fitted, the real engine serves a workload the fit never saw (the `replay`
config's requests drawn with seed `profile.seed + 1`, Poisson arrivals at each load, a fraction of
the capacity the serving runs measured), and then a simulated engine on the fitted model serves
the same requests at the same arrivals, with the same schedulers and KV cache settings. Both run
in one process minutes apart, so the comparison sees the machine at one speed: on a VM whose speed
wanders between processes this is the only comparison that measures the cost model rather than
the VM (docs/simulator.md).
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

COMPARED = ("ttft_ms", "tpot_ms", "e2e_ms")  # each compared at its mean and p90


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

    if not settings.validate_loads:
        return []
    if capacity <= 0:
        raise ValueError("profile.validate_loads are fractions of the capacity the serving runs measure; set profile.serving_requests > 0")
    seed = settings.seed + 1
    workload_config = OmegaConf.merge(llm.config.replay, {"num_requests": settings.serving_requests, "seed": seed})
    requests = build_workload(workload_config, prompt_token_ids(llm, workload_config.vocab_size)).requests
    twin = simulated_twin(llm, profile_path)
    rng = np.random.default_rng(seed)
    rows = []
    for load in settings.validate_loads:
        rate = load * capacity
        arrivals = arrival_times(len(requests), rate, "poisson", 1.0, rng).tolist()
        timed = [replace(r, arrival=t) for r, t in zip(requests, arrivals)]
        real, simulated = (_served(engine, timed) for engine in (llm, twin))
        rows.append(comparison(load, rate, real, simulated))
        progress(f"validation at {load:.0%} of capacity ({rate:.2f} req/s): {summary_line(rows[-1])}")
    return rows


def _served(llm, requests) -> dict:
    llm.executor.reset_prefix_cache()
    result = replay([llm], requests, RoundRobinRouter(), progress=False)
    return summarize(result.timings, result.duration)


def comparison(load: float, rate: float, real: dict, simulated: dict) -> dict:
    """Real and simulated figures side by side with the simulation's relative error."""
    row = {"load": load, "rate": rate, "requests": real["requests"]}
    for metric in COMPARED:
        for stat in ("mean", "p90"):
            row[f"{metric}.{stat}"] = _pair(real[metric][stat], simulated[metric][stat])
    row["preemptions"] = {"real": real["preemptions"], "simulated": simulated["preemptions"]}
    return row


def _pair(real: float | None, simulated: float | None) -> dict:
    error = (simulated - real) / real if real and simulated is not None else None
    return {"real": real, "simulated": simulated, "error": error}


def summary_line(row: dict) -> str:
    parts = [f"{key} {row[key]['real']:.1f}/{row[key]['simulated']:.1f} ms ({row[key]['error']:+.0%})" for key in row if "." in key and row[key]["error"] is not None]
    preemptions = row["preemptions"]
    return "; ".join(parts) + f"; preemptions {preemptions['real']}/{preemptions['simulated']} (real/simulated)"


def format_validation(rows: list[dict]) -> str:
    """The comparisons as a table: real / simulated (error) per cell."""
    header = ["load", *(f"{metric.removesuffix('_ms').upper()} {stat} ms" for metric in COMPARED for stat in ("mean", "p90")), "preemptions"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['load']:.0%} ({row['rate']:.2f} req/s)"]
        for metric in COMPARED:
            for stat in ("mean", "p90"):
                pair = row[f"{metric}.{stat}"]
                error = f" ({pair['error']:+.0%})" if pair["error"] is not None else ""
                cells.append(f"{_number(pair['real'])} / {_number(pair['simulated'])}{error}")
        cells.append(f"{row['preemptions']['real']} / {row['preemptions']['simulated']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "real / simulated (error of the simulation):\n" + "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
