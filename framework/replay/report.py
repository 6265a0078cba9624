"""A run's JSON document and its table on stdout."""

from __future__ import annotations

import json
from pathlib import Path

from framework.replay.driver import ReplayResult
from framework.replay.statistics import GROUPINGS

MAX_TIMELINE_POINTS = 500  # per replica in the JSON (every step stays in the figure)
REPORT_NAME = "replay.json"


def offered_rate(arrivals) -> float | None:
    """Requests per second the workload offers: (n - 1) over the span of its arrivals."""
    arrivals = sorted(arrivals)
    span = arrivals[-1] - arrivals[0] if arrivals else 0.0
    return (len(arrivals) - 1) / span if span > 0 else None


def report_document(setup: dict, workload: dict, result: ReplayResult, statistics: dict) -> dict:
    """One run: what ran (`setup`), on what (`workload`), the statistics and the timelines."""
    timings = result.timings
    return {
        "setup": setup,
        "workload": {**workload, "requests": len(timings), "offered_rate": offered_rate([t.arrival for t in timings])},
        "statistics": {**statistics, "prefix_hit_rate": result.prefix_hit_rate, **peaks(result)},
        "timelines": [line.thinned(MAX_TIMELINE_POINTS) for line in result.timelines],
        "requests": [
            {
                "arrival": t.arrival, "prompt_len": t.prompt_len, "output_tokens": t.output_tokens,
                "ttft_ms": _ms(t.ttft), "tpot_ms": _ms(t.tpot), "e2e_ms": _ms(t.e2e), "preemptions": t.preemptions,
                "error": t.error, "tenant": t.tenant, "priority": t.priority,
            }
            for t in timings
        ],
    }


def peaks(result: ReplayResult) -> dict:
    """The most requests waiting and the most KV cache in use on any replica after any step (None
    without timelines: against a URL)."""
    lines = [line for line in result.timelines if line.time]
    return {
        "peak_waiting": max((max(line.waiting) for line in lines), default=None),
        "peak_kv_cache_usage": max((max(line.kv_cache_usage) for line in lines), default=None),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def write_report(document: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT_NAME
    path.write_text(json.dumps(document, indent=1))
    return path


def read_reports(folder: Path) -> list[dict]:
    """Every run document below `folder` (a sweep's jobs each write one)."""
    return [json.loads(path.read_text()) for path in sorted(Path(folder).rglob(REPORT_NAME))]


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_table(document: dict) -> str:
    s = document["statistics"]
    rate = lambda value, unit: "-" if value is None else f"{value:.2f} {unit}"  # noqa: E731
    number = lambda value: "-" if value is None else f"{value:.1f}"  # noqa: E731
    slo = s["slo"]
    bounds = ", ".join(f"{k.replace('_ms', '')} <= {v} ms" for k, v in slo.items() if k != "met" and v is not None) or "none set"
    lines = [
        *([f"SIMULATED: {document['setup']['simulated']}"] if document.get("setup", {}).get("simulated") else []),
        f"requests: {s['completed']} completed, {s['failed']} failed, in {s['duration_s']:.2f} s",
        f"throughput: {rate(s['request_throughput'], 'req/s')}, {rate(s['output_throughput'], 'output tok/s')}",
        f"goodput: {rate(s['goodput'], 'req/s')} ({slo['met']} requests met the SLO: {bounds})",
        f"preemptions: {s['preemptions']}; prefix hit rate: {share(s['prefix_hit_rate'])}; "
        f"peak waiting: {'-' if s['peak_waiting'] is None else s['peak_waiting']}; peak KV cache use: {share(s['peak_kv_cache_usage'])}",
        f"{'latency (ms)':14} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}",
    ]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "end to end")):
        d = s[key]
        lines.append(f"{label:14} {number(d['mean']):>9} {number(d['p50']):>9} {number(d['p90']):>9} {number(d['p99']):>9}")
    lengths = s.get("by_length")
    if lengths and lengths["median_tokens"] is not None:
        short, long = lengths["short"], lengths["long"]
        lines.append(
            f"TTFT p90 of short requests (prompt + output < {lengths['median_tokens']:g} tokens): {number(short['ttft_ms']['p90'])} ms "
            f"({short['requests']}); of the others: {number(long['ttft_ms']['p90'])} ms ({long['requests']})"
        )
    for name, attribute in GROUPINGS.items():
        if name in s:
            lines += group_table(attribute, s[name], s[f"all_{name}_backlogged_s"])
    return "\n".join(lines)


def group_table(attribute: str, groups: dict, backlogged_s: float) -> list[str]:
    """One line per tenant (or priority): requests, output share, share while all were backlogged, TTFT p90, goodput."""
    lines = [
        f"{attribute:14} {'requests':>9} {'output':>9} {'backlogged':>11} {'TTFT p90':>9} {'goodput':>9}"
        f"   (backlogged: share of the output while every {attribute} had a request waiting, {backlogged_s:.2f} s)"
    ]
    for key, g in groups.items():
        p90 = g["ttft_ms"]["p90"]
        goodput = "-" if g["goodput"] is None else f"{g['goodput']:.2f}"
        lines.append(
            f"{key:14} {g['requests']:>9} {share(g['output_share']):>9} {share(g['backlogged_share']):>11} "
            f"{'-' if p90 is None else f'{p90:.1f}':>9} {goodput:>9}"
        )
    return lines
