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
    """A sweep's runs side by side: against the rate when some configuration ran at several
    loads, else (one run per configuration, such as a sweep of schedulers) as bars."""
    labels = configuration_labels(documents)
    if len(set(labels)) == len(labels):
        return configurations_figure(documents, labels, path)
    return rate_figure(documents, labels, path)


def rate_figure(documents: list[dict], labels: list[str], path: Path) -> Path:
    """Goodput and TTFT p90 against the offered rate, one line per configuration (the runs'
    overrides other than those that set the load)."""
    from matplotlib.figure import Figure

    lines: dict[str, list[tuple]] = defaultdict(list)
    for doc, label in zip(documents, labels):
        s = doc["statistics"]
        lines[label].append((request_rate(doc), s["goodput"], s["ttft_ms"]["p90"]))
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    goodput, ttft = figure.subplots(1, 2)
    for label, points in sorted(lines.items()):
        points.sort()
        rates = [p[0] for p in points]
        goodput.plot(rates, [p[1] for p in points], marker="o", label=label)
        ttft.plot(rates, [p[2] for p in points], marker="o", label=label)
    goodput.set(title=f"goodput ({slo_bounds(documents)})", xlabel="request rate (req/s)", ylabel="requests/s meeting the SLO")
    ttft.set(title="TTFT p90", xlabel="request rate (req/s)", ylabel="ms")
    for axes in (goodput, ttft):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(sweep_title(documents, 140), fontsize="medium")
    figure.savefig(path, dpi=100)
    return path


def configurations_figure(documents: list[dict], labels: list[str], path: Path) -> Path:
    """One group of bars per configuration: goodput; TTFT p90 of all, short and long requests;
    and, when requests have tenants, each tenant's TTFT p90 and its share of the output while
    every tenant was backlogged."""
    from matplotlib.figure import Figure

    stats = [doc["statistics"] for doc in documents]
    tenants = sorted({name for s in stats for name in s.get("tenants", {})})
    figure = Figure(figsize=(16 if tenants else 9, 4.8), layout="constrained")
    panels = figure.subplots(1, 4 if tenants else 2)
    x = np.arange(len(labels))
    panels[0].bar(x, [s["goodput"] or 0.0 for s in stats], color="C2")
    panels[0].set(title=f"goodput ({slo_bounds(documents)})", ylabel="requests/s meeting the SLO")
    ttft = {
        "all": [_ttft_p90(s) for s in stats],
        "short": [_ttft_p90(s, "by_length", "short") for s in stats],
        "long": [_ttft_p90(s, "by_length", "long") for s in stats],
    }
    _grouped_bars(panels[1], x, ttft, "TTFT p90 (short: prompt + output < median)", "ms")
    if tenants:
        per_tenant = {name: [_ttft_p90(s, "tenants", name) for s in stats] for name in tenants}
        _grouped_bars(panels[2], x, per_tenant, "TTFT p90 per tenant", "ms")
        bottom = np.zeros(len(stats))
        for i, name in enumerate(tenants):
            shares = np.array([s.get("tenants", {}).get(name, {}).get("backlogged_share") or 0.0 for s in stats])
            panels[3].bar(x, shares, bottom=bottom, color=f"C{i}", label=name)
            bottom += shares
        panels[3].set(title="output share, all tenants backlogged", ylabel="share of output tokens", ylim=(0, 1.15))
        panels[3].legend(fontsize="small", ncols=len(tenants), loc="upper center")
    key, ticks = common_key(labels)
    for axes in panels:
        axes.set_xticks(x, ticks, rotation=20, ha="right", fontsize="small")
        axes.set_xlabel(key)
        axes.grid(alpha=0.3, axis="y")
    figure.suptitle(sweep_title(documents, 200 if tenants else 110), fontsize="medium")
    figure.savefig(path, dpi=100)
    return path


def _ttft_p90(statistics: dict, *path: str) -> float | None:
    """The TTFT p90 of `statistics` or of the group at `path` in it (None where a run has none)."""
    for key in path:
        statistics = statistics.get(key, {})
    return statistics.get("ttft_ms", {}).get("p90")


def common_key(labels: list[str]) -> tuple[str, list[str]]:
    """("scheduler", ["fcfs", "sjf"]) for ["scheduler=fcfs", "scheduler=sjf"]; ("", labels) when
    the labels are not one override of the same key each."""
    parts = [label.partition("=") for label in labels]
    if all(eq and " " not in label for (_, eq, _), label in zip(parts, labels)) and len({key for key, _, _ in parts}) == 1:
        return parts[0][0], [value for _, _, value in parts]
    return "", labels


def _grouped_bars(axes, x, series: dict[str, list], title: str, ylabel: str) -> None:
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        axes.bar(x + (i - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values], width, label=name)
    axes.set(title=title, ylabel=ylabel)
    axes.margins(y=0.15)  # room above the bars for the legend
    axes.legend(fontsize="small", ncols=len(series), loc="upper center")


def slo_bounds(documents: list[dict]) -> str:
    slo = documents[0]["statistics"]["slo"] if documents else {}
    return ", ".join(f"{k} {v}" for k, v in slo.items() if k != "met" and v is not None) or "no SLO set"


def sweep_title(documents: list[dict], width: int) -> str:
    """The workload the runs share, under the simulation's label when the step times were simulated."""
    simulated = {doc["setup"].get("simulated") for doc in documents} - {None, False}
    rates = [doc["workload"].get("offered_rate") for doc in documents]
    offered = f"; offered {rates[0]:.1f} req/s" if rates and rates[0] and len(set(rates)) == 1 else ""
    lines = [f"SIMULATED: {label}" for label in sorted(simulated)] + [textwrap.fill(describe_workload(documents) + offered, width)]
    return "\n".join(lines)


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
