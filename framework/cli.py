"""`python -m framework [overrides]`: generate for a few prompts with the configured components.

`--list-plugins` (with `--check`: and import every registered factory) is answered before Hydra
parses the command line; everything else (`--help`, `--cfg job`, `-m` sweeps, overrides) is Hydra's.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

USER_ERROR_EXIT = 2


def _fail(message: str) -> None:
    print(f"framework: error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def list_plugins(plugins) -> str:
    from framework import __version__

    kinds = {
        kind: [{"name": e.name, "provider": e.provider} for e in registry]
        for kind, registry in plugins.registries.items()
    }
    return json.dumps({"framework": __version__, "plugins": plugins.describe(), "components": kinds}, indent=2)


def broken_factories(plugins) -> list[str]:
    """Import every registered factory (the lazy "module:attr" ones otherwise load only when a
    config selects them); one message for each that cannot be loaded or is not of its kind."""
    from framework.plugins.kinds import KINDS

    problems = []
    for kind in KINDS.values():
        for entry in plugins[kind.name]:
            try:
                kind.checked_factory(entry)
            except ImportError as exc:  # Entry.load's message names the entry, its provider and the path
                problems.append(f"{kind.label} {exc}")
            except TypeError as exc:
                problems.append(str(exc))
            except Exception as exc:  # the module raised something else while importing
                problems.append(f"{kind.label} {entry.name!r} from {entry.provider}: importing {entry.factory!r} raised {exc!r}")
    return problems


def _check_plugins(plugins) -> None:
    problems = broken_factories(plugins)
    for problem in problems:
        print(f"framework: error: {problem}", file=sys.stderr)
    if problems:
        sys.exit(USER_ERROR_EXIT)
    count = sum(len(registry.names()) for registry in plugins.registries.values())
    print(f"framework: all {count} registered factories load", file=sys.stderr)


def default_model_name(cfg) -> str:
    from pathlib import Path

    return Path(cfg.model.path).name if cfg.model.path else "SmolLM2-135M-Instruct"


def apply_mode_defaults(cfg) -> None:
    """Settings whose `auto` depends on the mode: an engine's clock (the simulated engine's) is
    the wall clock when serving, so its steps take their time for live clients, and virtual
    otherwise."""
    if cfg.engine.get("clock") == "auto":
        cfg.engine.clock = "wall" if cfg.mode == "serve" else "virtual"


def run(cfg, plugins) -> None:
    """Build the engine from the composed config, then do what `mode` says."""
    from framework.api.llm import LLM
    from framework.models.checkpoint import CheckpointError
    from framework.plugins.registry import UnknownNameError

    modes = {"generate": _generate, "serve": _serve, "bench": _bench, "profile": _profile}
    own_engines = {"replay": _replay}  # modes that build their engines themselves (none, one or several)
    if cfg.mode not in modes | own_engines:
        _fail(f"mode must be one of {', '.join(modes | own_engines)}; got {cfg.mode!r}")
    if cfg.mode in ("bench", "profile") and cfg.engine.name == "sim":
        _fail(f"mode={cfg.mode} times the real engine; engine=sim computes nothing to time (its steps come from a profile)")
    apply_mode_defaults(cfg)
    if _serves_forward_only(cfg, plugins):
        return
    if cfg.mode in own_engines:
        try:
            own_engines[cfg.mode](cfg, plugins)
        except (UnknownNameError, CheckpointError, ImportError, ValueError, TypeError) as exc:
            _fail(str(exc))
        return
    started = time.perf_counter()
    try:
        llm = LLM(config=cfg, plugins=plugins)
    except (UnknownNameError, CheckpointError, ImportError, ValueError, TypeError) as exc:
        _fail(str(exc))
    try:
        with llm:
            modes[cfg.mode](cfg, llm, started)
    except ValueError as exc:
        _fail(str(exc))


def _serves_forward_only(cfg, plugins) -> bool:
    """Under torchrun, a rank other than 0 of a tensor-parallel engine runs only the forward, until
    rank 0 stops (docs/tensor-parallel.md); True once it has."""
    if cfg.engine.get("tensor_parallel_size", 1) == 1:
        return False
    from framework.distributed.group import torchrun_rank

    if not torchrun_rank():  # None (no torchrun) or rank 0
        return False
    from framework.distributed.worker import serve_forward
    from framework.models.checkpoint import resolve_checkpoint

    serve_forward(cfg.engine, cfg.model, resolve_checkpoint(cfg.model.path), plugins)
    return True


def _generate(cfg, llm, started: float) -> None:
    from framework.sampling_params import SamplingParams

    from framework.engine.clock import WallClock

    loaded = time.perf_counter()
    engine = llm.executor.model_engine
    began = engine.clock.now()  # the engine's time: a simulated engine's may be virtual
    params = SamplingParams(max_tokens=cfg.run.max_tokens, temperature=cfg.run.temperature)
    prompts = list(cfg.run.prompts)
    inputs = [llm.chat_prompt([{"role": "user", "content": p}]) if cfg.run.chat else p for p in prompts]
    outputs = llm.generate(inputs, params, use_tqdm=False)
    took = engine.clock.now() - began
    for prompt, out in zip(prompts, outputs):
        print(f"### {prompt}\n{out.outputs[0].text.strip()}\n")
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = llm.kv_cache_stats
    s = cfg.scheduler
    simulated = "" if isinstance(engine.clock, WallClock) else " simulated"
    print(
        f"[framework] {len(outputs)} requests, {generated} tokens in {took:.2f}s{simulated} "
        f"({generated / max(took, 1e-9):.1f} tok/s); load {loaded - started:.2f}s; "
        f"scheduler {s.capacity}+{s.micro_batch}, kv_cache {cfg.kv_cache.name} "
        f"({stats.num_blocks} blocks of {cfg.kv_cache.block_size}, prefix hit rate {stats.prefix_hit_rate:.0%}), "
        f"decoder {cfg.decoder.name}, engine {cfg.engine.name} (backend {engine.backend_name}) "
        f"on {engine.device} {str(engine.dtype).replace('torch.', '')}"
    )


def _serve(cfg, llm, started: float) -> None:
    from framework.server.app import check_settings, serve

    s = cfg.server
    check_settings(s.api_key, s.max_body_bytes)
    name = s.model_name or default_model_name(cfg)
    print(f"[framework] serving {name} on http://{s.host}:{s.port}/v1 (loaded in {time.perf_counter() - started:.1f}s)", flush=True)
    hosts = list(s.allowed_hosts) if s.allowed_hosts is not None else None
    settings = {"max_body_bytes": s.max_body_bytes, "allowed_hosts": hosts, "enable_docs": s.enable_docs}
    # uvicorn raises the SIGTERM it shut down on again once done, whose default action skips
    # `with llm`: close the LLM first (a tensor-parallel engine's rank processes stop)
    signal.signal(signal.SIGTERM, functools.partial(_close_then_end, llm))
    serve(llm, s.host, s.port, name, s.api_key, s.graceful_timeout, **settings)


def _close_then_end(llm, signum, frame) -> None:
    """Close `llm`, then end the process as the signal's default action does."""
    llm.close()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def _bench(cfg, llm, started: float) -> None:
    from framework.bench.runner import print_rows, run_benchmark
    from framework.models.checkpoint import resolve_checkpoint
    from framework.sampling_params import SamplingParams

    llm.generate([[llm.tokenizer.eos_token_id or 0] * 4], SamplingParams(max_tokens=1), use_tqdm=False)
    cold_start = time.perf_counter() - started  # from LLM() to the first generated token
    print_rows(run_benchmark(cfg, llm, resolve_checkpoint(cfg.model.path), cold_start))


def _replay(cfg, plugins) -> None:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from framework.replay.runner import run_replay

    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    out_dir = Path(cfg.replay.out or (hydra.runtime.output_dir if hydra else "."))
    if cfg.replay.out and hydra and hydra.mode == RunMode.MULTIRUN:
        out_dir /= str(hydra.job.num)  # each job of a sweep its own folder
    run_replay(cfg, plugins, out_dir, list(hydra.overrides.task) if hydra else [])


def _profile(cfg, llm, started: float) -> None:
    from framework.sim.profiler import profile_steps

    from framework.sim.validation import format_validation, validate

    progress = lambda line: print(f"[profile] {line}", flush=True)  # noqa: E731
    profile = profile_steps(llm, cfg.profile, progress)
    profile.save(cfg.profile.out)
    fit, held_out = profile.errors["fit"], profile.errors["held_out"]
    print(
        f"[framework] {len(profile.samples)} steps timed on {profile.device} {profile.dtype}; the fitted cost model is "
        f"off by {fit['mean']:.1%} on average (at most {fit['max']:.1%}), by {held_out.get('mean', 0):.1%} "
        f"(at most {held_out.get('max', 0):.1%}) on each step left out of the fit; wrote {cfg.profile.out}"
    )
    capacity = profile.setup.get("serving", {}).get("capacity", 0.0)
    validation = validate(llm, cfg.profile, capacity, cfg.profile.out, progress)
    if validation:
        profile.setup["validation"] = validation
        profile.save(cfg.profile.out)
        print(format_validation(validation))


def main() -> None:
    from framework.plugins.manager import PluginError, create_plugin_manager

    argv = sys.argv[1:]
    try:
        plugins = create_plugin_manager()
    except PluginError as exc:
        _fail(str(exc))
    if "--check" in argv and "--list-plugins" not in argv:
        _fail("--check goes with --list-plugins: python -m framework --list-plugins --check")
    if "--list-plugins" in argv:
        print(list_plugins(plugins))
        if "--check" in argv:
            _check_plugins(plugins)
        return
    from framework.config import check_overrides
    from framework.plugins.registry import UnknownNameError

    try:
        check_overrides(argv, plugins)
    except UnknownNameError as exc:
        _fail(str(exc))

    import hydra

    from framework.config import register_configs

    try:
        register_configs(plugins)
    except PluginError as exc:
        _fail(str(exc))

    @hydra.main(version_base="1.3", config_path="pkg://framework.conf", config_name="config")
    def app(cfg) -> None:
        run(cfg, plugins)

    app()
