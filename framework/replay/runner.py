"""`mode=replay`: build the workload and the replicas (or reach the URL), replay, then write the
run's JSON and figure and print its table."""

from __future__ import annotations

import gc
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from framework.engine.clock import VirtualClock
from framework.replay.driver import check_clocks, replay
from framework.replay.figures import FIGURE_NAME, describe_workload, run_figure
from framework.replay.http_client import replay_url
from framework.replay.report import format_table, report_document, write_report
from framework.replay.statistics import summarize
from framework.replay.workload import build_workload

URL_VOCAB_SIZE = 32000  # prompt token ids stay below this against a URL unless replay.vocab_size says otherwise


def run_replay(cfg, plugins, out_dir: Path, overrides: list[str]) -> dict:
    """Replay `cfg.replay`'s workload; returns the run's document (also written to `out_dir`)."""
    rc = cfg.replay
    if rc.replicas < 1:
        raise ValueError(f"replay.replicas must be at least 1; got {rc.replicas}")
    if rc.url:
        if rc.replicas != 1:
            raise ValueError("replay.replicas simulates engines in-process; with replay.url the server is the cluster")
        workload = build_workload(rc, np.arange(rc.vocab_size or URL_VOCAB_SIZE))
        result = replay_url(rc.url, rc.model, workload.requests, rc.progress)
        setup = {"target": rc.url}
    else:
        llms = build_replicas(cfg, plugins)
        workload = build_workload(rc, prompt_token_ids(llms[0], rc.vocab_size))
        started = time.perf_counter()
        with fewer_collections():
            result = replay(llms, workload.requests, build_router(cfg, plugins), rc.progress, rc.slo.ttft_ms)
        setup = engine_setup(cfg, llms[0])
        setup.update(wall_seconds=time.perf_counter() - started, steps=sum(llm.executor.num_steps for llm in llms))
    setup["overrides"] = list(overrides)
    statistics = summarize(result.timings, result.duration, rc.slo.ttft_ms, rc.slo.tpot_ms)
    document = report_document(setup, workload.description, result, statistics)
    path = write_report(document, out_dir)
    figure = run_figure(result, figure_title(document), out_dir / FIGURE_NAME)
    print(format_table(document))
    if setup.get("clock") == "VirtualClock":
        wall = setup["wall_seconds"]
        print(f"[framework] simulated {result.duration:.1f} s in {wall:.1f} s of wall time ({result.duration / wall:.1f}x real time, {setup['steps']} steps)")
    print(f"[framework] replay report {path}, figure {figure}")
    return document


@contextmanager
def fewer_collections():
    """Python's cyclic garbage collector rescans every long-lived object at each full collection,
    and a long replay keeps millions (prefix keys of prompt blocks, token times): ~15% of a
    simulated hour of traffic. While it runs, the objects that exist are frozen out of the scans
    and young ones are collected less often."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(20_000, 20, 10)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def build_replicas(cfg, plugins) -> list:
    from omegaconf import OmegaConf

    from framework.api.llm import LLM

    if cfg.replay.decode_runs and cfg.engine.name == "sim" and cfg.speculative.name == "none":
        budgets = {"num_tokens": cfg.scheduler.max_num_tokens, "max_batch_size": cfg.scheduler.max_batch_size}
        cfg = OmegaConf.merge(cfg, {"speculative": {"name": "decode_runs", **budgets}})
    first = LLM(config=cfg, plugins=plugins)
    check_clocks([first], cfg.replay.replicas)
    llms = [first] + [LLM(config=cfg, plugins=plugins) for _ in range(cfg.replay.replicas - 1)]  # (`replay` checks them all)
    if not isinstance(first.clock, VirtualClock):
        warm_up(first)
    return llms


def warm_up(llm) -> None:
    """One short request first, so that one-time costs (weight packing, first kernels) do not
    land on the replay's first requests."""
    from framework.sampling_params import SamplingParams

    llm.generate([[llm.tokenizer.eos_token_id or 0] * 4], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)


def build_router(cfg, plugins):
    from framework.executor.builder import Builder

    return Builder(cfg, plugins).make("router", cfg.kv_cache.block_size)


def prompt_token_ids(llm, vocab_size: int | None) -> np.ndarray:
    """The ids prompts are drawn from: the model's vocabulary (or its first `vocab_size`) less
    the tokenizer's special tokens."""
    size = min(vocab_size or math.inf, llm.executor.model_engine.vocab_size)
    ids = np.arange(int(size))
    return ids[~np.isin(ids, list(llm.tokenizer.all_special_ids))]


def engine_setup(cfg, llm) -> dict:
    rc = cfg.replay
    return {
        "target": "in-process",
        "engine": cfg.engine.name,
        "scheduler": f"{cfg.scheduler.capacity}+{cfg.scheduler.micro_batch}",
        "kv_cache": f"{cfg.kv_cache.name} ({llm.kv_cache_stats.num_blocks} blocks of {cfg.kv_cache.block_size})",
        "replicas": rc.replicas,
        "router": rc.router if rc.replicas > 1 else None,
        "clock": type(llm.clock).__name__,
        "simulated": llm.executor.model_engine.simulated,
    }


def figure_title(document: dict) -> str:
    setup = document["setup"]
    what = " ".join(setup.get("overrides", [])) or setup["target"]
    rate = document["workload"].get("rate")
    title = f"{what}\n{describe_workload([document])}" + (f"; rate {rate} req/s" if rate else "")
    return f"SIMULATED: {setup['simulated']}\n{title}" if setup.get("simulated") else title
