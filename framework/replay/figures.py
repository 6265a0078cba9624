"""Figures (PNG, matplotlib's object API: no pyplot state, no display needed): one run's latency
CDFs and timelines, and a sweep's runs side by side."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

FIGURE_NAME = "replay.png"
SWEEP_FIGURE_NAME = "sweep.png"


CDF_POINTS = 2000  # quantiles drawn per CDF, however many samples (a day's ITLs are millions)
TIMELINE_POINTS = 5000  # steps drawn per replica


def _cdf(axes, values_ms, title: str) -> None:
    values = np.sort(np.asarray(values_ms, dtype=float))
    if values.size:
        fractions = np.arange(1, values.size + 1) / values.size
        keep = np.unique(np.linspace(0, values.size - 1, min(values.size, CDF_POINTS)).astype(int))
        axes.plot(values[keep], fractions[keep])
    axes.set(title=title, xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
    axes.grid(alpha=0.3)


def run_figure(result, title: str, path: Path) -> Path:
    """Latency CDFs (TTFT, TPOT, ITL, end to end) over the queue and KV usage of each replica."""
    from matplotlib.figure import Figure

    done = [t for t in result.timings if t.completed]
    figure = Figure(figsize=(15, 8), layout="constrained")
    grid = figure.subplots(2, 3)
    _cdf(grid[0, 0], [t.ttft * 1000 for t in done], "TTFT")
    _cdf(grid[0, 1], [t.tpot * 1000 for t in done if t.tpot is not None], "TPOT")
    _cdf(grid[0, 2], [gap * 1000 for t in done for gap in t.itls], "inter-token latency")
    _cdf(grid[1, 0], [t.e2e * 1000 for t in done], "end-to-end latency")
    several = len(result.timelines) > 1
    for i, line in enumerate(line.thinned(TIMELINE_POINTS) for line in result.timelines):
        label = f" (replica {i})" if several else ""
        grid[1, 1].step(line["time"], line["waiting"], where="post", color=f"C{i}", label=f"waiting{label}")
        grid[1, 1].step(line["time"], line["running"], where="post", color=f"C{i}", linestyle=":", label=f"running{label}")
        grid[1, 2].step(line["time"], line["kv_cache_usage"], where="post", color=f"C{i}", label=f"replica {i}")
    grid[1, 1].set(title="requests over time", xlabel="s", ylabel="requests")
    grid[1, 2].set(title="KV cache in use", xlabel="s", ylabel="share of blocks", ylim=(0, 1.02))
    if not result.timelines:  # a server's internals are not seen from its URL
        for axes in grid[1, 1:]:
            axes.text(0.5, 0.5, "not seen from a URL", ha="center", va="center", transform=axes.transAxes)
    else:
        grid[1, 1].legend(fontsize="small")
    if several:
        grid[1, 2].legend(fontsize="small")
    figure.suptitle("\n".join(textwrap.fill(part, 160) for part in title.splitlines()), fontsize="medium")
    figure.savefig(path, dpi=100)
    return path


def sweep_figure(documents: list[dict], path: Path) -> Path:
    """Goodput and TTFT p90 against the offered rate, one line per configuration (the runs'
    overrides other than those that set the load)."""
    from matplotlib.figure import Figure

    lines: dict[str, list[tuple]] = defaultdict(list)
    for doc, label in zip(documents, configuration_labels(documents)):
        s = doc["statistics"]
        lines[label].append((request_rate(doc), s["goodput"], s["ttft_ms"]["p90"]))
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    goodput, ttft = figure.subplots(1, 2)
    for label, points in sorted(lines.items()):
        points.sort()
        rates = [p[0] for p in points]
        goodput.plot(rates, [p[1] for p in points], marker="o", label=label)
        ttft.plot(rates, [p[2] for p in points], marker="o", label=label)
    slo = documents[0]["statistics"]["slo"] if documents else {}
    bounds = ", ".join(f"{k} {v}" for k, v in slo.items() if k != "met" and v is not None) or "no SLO set"
    goodput.set(title=f"goodput ({bounds})", xlabel="request rate (req/s)", ylabel="requests/s meeting the SLO")
    ttft.set(title="TTFT p90", xlabel="request rate (req/s)", ylabel="ms")
    for axes in (goodput, ttft):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(describe_workload(documents), fontsize="medium")
    figure.savefig(path, dpi=100)
    return path


def request_rate(document: dict) -> float:
    """The x of a run in a sweep: the configured rate of synthetic arrivals, else (a trace) the
    rate its arrivals offer."""
    workload = document["workload"]
    return workload.get("rate") or workload["offered_rate"] or 0.0


NOT_DESCRIBED = ("requests", "offered_rate", "rate")  # vary along a sweep's x axis


def describe_workload(documents: list[dict]) -> str:
    """What the runs' workloads have in common, e.g. "arrivals poisson; input fixed 128"."""
    first = documents[0]["workload"] if documents else {}
    same = [k for k, v in first.items() if k not in NOT_DESCRIBED and all(d["workload"].get(k) == v for d in documents)]
    return "; ".join(f"{k.replace('_', ' ')} {first[k]}" for k in same)


LOAD_KEYS = ("replay.rate", "replay.time_scale")  # overrides that set the load, the sweep's x axis


def configuration_labels(documents: list[dict]) -> list[str]:
    """Each run's overrides less those every run shares and those that set the load: runs with
    one label are one configuration at several loads."""
    overrides = [doc["setup"].get("overrides", []) for doc in documents]
    shared = set.intersection(*map(set, overrides)) if overrides else set()
    own = [[o for o in run if o not in shared and o.partition("=")[0].lstrip("+~") not in LOAD_KEYS] for run in overrides]
    return [" ".join(run) or "default" for run in own]
