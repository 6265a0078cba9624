"""Runs the configured workloads on the configured engine and, with `bench.compare=true`, on the
transformers peers in the same process, alternating runs; prints a table and one JSON line each."""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import time

import torch

from framework.bench.measure import matmul_peak_gflops, model_flops
from framework.bench.workloads import WORKLOADS, Workload, make_workload
from framework.sampling_params import SamplingParams


def _workload_names(spec: str) -> list[str]:
    names = list(WORKLOADS) if spec == "all" else [w.strip() for w in str(spec).split(",")]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload {unknown[0]!r}; available: {', '.join(WORKLOADS)}, all")
    return names


def _framework_run(llm, workload: Workload, drafter) -> dict:
    """One timed run with `drafter` proposing (None: plain steps)."""
    executor = llm.executor
    llm.reset_prefix_cache()  # each run starts cold: only reuse within the workload counts
    before_steps, before = executor.num_steps, dataclasses.replace(executor.counters)
    kv_before = llm.kv_cache_stats
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=workload.ignore_eos) for n in workload.output_lens]
    configured, executor.drafter = executor.drafter, drafter
    started = time.perf_counter()
    try:
        outputs = llm.generate(workload.prompts, params, use_tqdm=False)
    finally:
        executor.drafter = configured
    wall = time.perf_counter() - started
    tokens = [o.outputs[0].token_ids for o in outputs]
    assert not workload.ignore_eos or [len(t) for t in tokens] == workload.output_lens
    after = executor.counters
    delta = type(after)(**{f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after)})
    kv_after = llm.kv_cache_stats
    queried = kv_after.prefix_queried_tokens - kv_before.prefix_queried_tokens
    steps = executor.num_steps - before_steps
    return {
        "wall_s": wall,
        "steps": steps,
        "tokens": tokens,
        "counters": delta,
        "prefix_hit_rate": (kv_after.prefix_hit_tokens - kv_before.prefix_hit_tokens) / queried if queried else 0.0,
    }


def run_benchmark(cfg, llm, checkpoint_dir, cold_start_s: float) -> list[dict]:
    bench = cfg.bench
    engine = llm.executor.model_engine
    dtype, device = engine.dtype, engine.device
    peak = matmul_peak_gflops(dtype, device)
    special = getattr(llm.tokenizer, "all_special_ids", [])
    names = _workload_names(bench.workload)
    drafters = _modes(llm)
    reference = None
    if bench.compare:
        from framework.bench.baselines import load_reference

        reference = load_reference(checkpoint_dir, dtype, device)
    # Both engines' long-lived objects (modules, tokenizers: ~400k with the peer loaded) out of the
    # garbage collector's full passes, which would otherwise walk them during every timed run
    # (up to ~10% of a W1 run here, more after the continuous-batching peer has run).
    gc.collect()
    gc.freeze()
    rows = []
    for name in names:
        workload = make_workload(name, engine.vocab_size, special, seed=bench.seed, scale=bench.scale, tokenizer=llm.tokenizer)
        peers = {"static": [], "continuous": []} if reference is not None else {}
        ours: dict[str, list] = {mode: [] for mode in drafters}
        if bench.warmup:
            small = make_workload(name, engine.vocab_size, special, seed=bench.seed + 1, scale=min(bench.scale, 0.25), tokenizer=llm.tokenizer)
            for drafter in drafters.values():
                _framework_run(llm, small, drafter)
            for peer in peers:
                _peer_run(peer, reference, small, llm)
        for _ in range(bench.runs):  # the engine's modes and the peers alternate
            for mode, drafter in drafters.items():
                ours[mode].append(_framework_run(llm, workload, drafter))
            for peer in peers:
                peers[peer].append(_peer_run(peer, reference, workload, llm))
        # measured again after each workload, the best so far: a slow moment of a shared machine
        # at start would otherwise pass for its peak (and the shares for more than they are)
        peak = max(peak, matmul_peak_gflops(dtype, device))
        for mode, runs in ours.items():
            rows.append(_summarise(cfg, name, workload, runs, peers, peak, llm, cold_start_s) | _speculation(mode, runs, ours))
    return rows


def _modes(llm) -> dict:
    """The drafters to measure: the configured one, and beside it plain steps (`none`)."""
    drafter, name = llm.executor.drafter, llm.config.speculative.name
    return {"none": None} if name == "none" else {"none": None, name: drafter}


def _speculation(mode: str, runs: list[dict], ours: dict[str, list]) -> dict:
    """A row's speculative-decoding figures, and for a drafter its speed and output against `none`."""
    from framework.drafter.base import SpeculationStats

    best = min(runs, key=lambda r: r["wall_s"])
    stats = SpeculationStats.of(best["counters"], best["steps"])
    row = {
        "speculative": mode,
        "acceptance_rate": stats.acceptance_rate,
        "accepted_per_verify_step": stats.mean_accepted_per_verify_step,
        "draft_tokens": stats.draft_tokens,
    }
    if mode != "none":
        plain = ours["none"]
        row["speedup_vs_plain"] = statistics.median(r["wall_s"] for r in plain) / statistics.median(r["wall_s"] for r in runs)
        row["same_output_as_plain"] = all(r["tokens"] == plain[0]["tokens"] for r in runs)
    return row


def _peer_run(peer: str, reference, workload: Workload, llm):
    from framework.bench import baselines

    try:
        if peer == "static":
            return baselines.static_generate(reference, workload, pad_id=llm.tokenizer.pad_token_id or 0)
        return baselines.continuous_generate(reference, workload)
    except Exception as exc:  # a peer that cannot run here is reported, not fatal
        return f"unavailable: {exc!r}"[:200]


def _summarise(cfg, name, workload, ours, peers, peak, llm, cold_start_s) -> dict:
    median = statistics.median
    wall = median(r["wall_s"] for r in ours)
    best = min(ours, key=lambda r: r["wall_s"])
    generated = sum(len(t) for t in best["tokens"])  # (W5 honours EOS: what was really produced)
    counters = best["counters"]
    flops = model_flops(llm.executor.model_engine.model, counters)
    gflops = flops / best["wall_s"] / 1e9
    row = {
        "workload": name,
        "scheduler": f"{cfg.scheduler.capacity}+{cfg.scheduler.micro_batch}",
        "kv_cache": cfg.kv_cache.name,
        "decoder": cfg.decoder.name,
        "backend": llm.executor.model_engine.backend_name,
        "dtype": str(llm.executor.model_engine.dtype).replace("torch.", ""),
        "device": str(llm.executor.model_engine.device),
        "threads": torch.get_num_threads(),
        "output_tok_s": generated / wall,
        "total_tok_s": (generated + workload.num_prompt_tokens) / wall,
        "output_tokens": generated,
        "wall_s": wall,
        "gflops": gflops,
        "matmul_peak_gflops": peak,
        "peak_share": gflops / peak,
        "mean_step_ms": 1000 * counters.step_seconds / max(best["steps"], 1),
        "host_overhead": 1 - counters.forward_seconds / counters.step_seconds if counters.step_seconds else 0.0,
        "kv_cache_blocks": llm.kv_cache_stats.num_blocks,
        "prefix_hit_rate": best["prefix_hit_rate"],
        "cold_start_s": cold_start_s,
        "runs": len(ours),
    }
    for peer, times in peers.items():
        numbers = [t for t in times if isinstance(t, float)]
        if numbers:
            row[f"{peer}_wall_s"] = median(numbers)
            row[f"speedup_vs_{peer}"] = median(numbers) / wall
        else:
            row[f"speedup_vs_{peer}"] = None
            row[f"{peer}_error"] = times[0] if times else "not run"
    return row


def print_rows(rows: list[dict]) -> None:
    header = f"{'workload':8} {'spec':>11} {'out tok/s':>10} {'wall s':>8} {'GFLOP/s':>8} {'peak %':>7} {'step ms':>8} {'host %':>7} {'hit %':>6} {'vs gen':>7} {'vs cb':>7} {'vs plain':>8} {'acc/vstep':>9}"
    print(header)
    for r in rows:
        vs = lambda k: f"{r[k]:.2f}x" if r.get(k) else "-"  # noqa: E731
        print(
            f"{r['workload']:8} {r['speculative']:>11} {r['output_tok_s']:10.1f} {r['wall_s']:8.2f} {r['gflops']:8.1f} {100 * r['peak_share']:6.1f}% "
            f"{r['mean_step_ms']:8.1f} {100 * r['host_overhead']:6.1f}% {100 * r['prefix_hit_rate']:5.0f}% "
            f"{vs('speedup_vs_static'):>7} {vs('speedup_vs_continuous'):>7} {vs('speedup_vs_plain'):>8} {r['accepted_per_verify_step']:9.2f}"
        )
    for r in rows:
        print(json.dumps(r))
