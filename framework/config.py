"""Typed configuration: one dataclass per config group, and the glue that turns every registered
implementation into a Hydra config-group option.

`scheduler=<name>` accepts any capacity-scheduler or micro-batch-scheduler name (the option sets
that one and keeps the default for the other); `kv_cache=`, `decoder=` and `engine=` accept their
kind's registered names; `model=` takes YAML presets (conf/model/).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins as HydraPlugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from framework.plugins.kinds import KINDS, groups


@dataclass
class ModelConfig:
    path: str | None = None  # a Hugging Face checkpoint folder; None: the shipped SmolLM2-135M-Instruct
    dtype: str = "auto"  # auto (the checkpoint's where the device runs it natively, else float32) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    seed: int = 0  # seed of the engine-wide sampling generator


@dataclass
class SchedulerConfig:
    capacity: str = "guaranteed_no_evict"
    micro_batch: str = "fcfs"
    max_batch_size: int = 64
    max_num_tokens: int = 2048  # token budget of one step (prefill chunks + decode tokens)


@dataclass
class KVCacheConfig:
    name: str = "paged"
    block_size: int = 16
    max_tokens: int | None = None  # pool size in tokens; None: sized from memory_fraction
    memory_fraction: float = 0.05  # of the device's total memory (CPU RAM or GPU memory)
    enable_prefix_caching: bool = True


@dataclass
class DecoderConfig:
    name: str = "sampling"


@dataclass
class EngineConfig:
    name: str = "pytorch"
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    pack_weights: bool = True  # let the backend repack linear weights once after loading (CPU: oneDNN's layout)
    backend: str = "auto"  # the hot ops' implementation: auto (the best that supports the device) or a name
    tensor_parallel_size: int = 1  # ranks the model is sharded over (docs/tensor-parallel.md); 1: one process, no torch.distributed
    distributed_timeout: float = 60.0  # seconds a rank waits in a collective before the step fails (tensor_parallel_size > 1)
    # (each registered backend's own settings join these fields: see `selected_config_fields`)


@dataclass
class SpeculativeConfig:
    """Speculative decoding: a drafter proposes tokens that each step verifies."""

    name: str = "none"  # none | ngram | draft_model | a plugin's drafter
    num_tokens: int = 4  # k: draft tokens per request and step, at most
    max_batch_size: int = 4  # propose only while a step decodes at most this many requests


@dataclass
class ResourcesConfig:
    """Resource managers beside the KV cache manager (registered through `register_resource_managers`)."""

    extra: list[str] = field(default_factory=list)  # their names, in the order they run (the KV cache last)


@dataclass
class ServerConfig:
    """`mode=serve`: the OpenAI-compatible HTTP server."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, all but /health and /metrics require `Authorization: Bearer <api_key>`
    model_name: str | None = None  # the name clients pass as `model`; default: the checkpoint's
    graceful_timeout: float = 10.0  # seconds in-flight requests get to finish on SIGTERM
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413 before they are parsed
    allowed_hosts: list[str] | None = None  # Host header names accepted; None: loopback names without api_key, any with it
    enable_docs: bool = False  # serve /docs, /redoc and /openapi.json


@dataclass
class BenchConfig:
    """`mode=bench`: the standard workloads (docs/benchmarks.md)."""

    workload: str = "W1"  # W1 | W2 | W3 | W4 | all | a comma list
    compare: bool = False  # also run transformers generate (static) and continuous batching
    runs: int = 3  # timed runs per engine; the median is reported
    warmup: bool = True
    seed: int = 0
    scale: float = 1.0  # shrink counts and lengths (smoke tests); 1.0 is the standard workload


@dataclass
class LengthConfig:
    """A distribution of token counts (prompt or output lengths of `mode=replay`'s synthetic requests)."""

    dist: str = "fixed"  # fixed | uniform | zipf | lognormal
    value: int = 128  # fixed: the length; lognormal: the median
    min: int = 1  # uniform, zipf, lognormal: lengths are drawn (or clipped) within [min, max]
    max: int = 512
    zipf_a: float = 1.5  # zipf: the exponent, P(min + k - 1) ~ k^-zipf_a within [min, max]
    sigma: float = 1.0  # lognormal: the standard deviation of the log length
    fit: str | None = None  # lognormal: a trace file whose lengths give the median and sigma instead


@dataclass
class SLOConfig:
    """Service-level objectives for goodput; None: no bound on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None


@dataclass
class TenantConfig:
    """One tenant of `mode=replay`'s workload: each request is its with probability `share` over
    the sum of the tenants' shares."""

    name: str = ""
    share: float = 1.0
    priority: int | None = None  # every request of the tenant carries it (lower is more important)


@dataclass
class ReplayConfig:
    """`mode=replay`: a serving benchmark, arrivals from a distribution or a trace
    (docs/serving-benchmark.md)."""

    num_requests: int | None = 100  # synthetic requests; with a trace: its first this many (None: all of it)
    rate: float = 4.0  # requests/s of the synthetic arrivals
    arrival: str = "poisson"  # poisson | gamma
    burstiness: float = 1.0  # gamma shape: 1 is Poisson, below 1 burstier (gap cv = 1/sqrt(burstiness))
    input: LengthConfig = field(default_factory=LengthConfig)
    output: LengthConfig = field(default_factory=lambda: LengthConfig(value=64, max=256))
    trace: str | None = None  # an Azure CSV or Mooncake JSONL file replayed at its own timestamps
    trace_format: str = "auto"  # auto (by suffix: .csv azure, .jsonl mooncake) | azure | mooncake
    time_scale: float = 1.0  # trace gaps are multiplied by this (0.1: ten times as fast)
    length_scale: float = 1.0  # trace lengths (and Mooncake's prefix blocks) are multiplied by this
    max_input_len: int | None = None  # then clipped to these (None: the model's length decides)
    max_output_len: int | None = None
    seed: int = 0  # arrivals, lengths, prompt token ids and tenants
    slo: SLOConfig = field(default_factory=SLOConfig)
    tenants: list[TenantConfig] = field(default_factory=list)  # who sends each request; empty: nobody in particular
    url: str | None = None  # drive this OpenAI-compatible server (streaming completions) instead of an in-process engine
    model: str | None = None  # with url: the model name to send (None: the server's first in /v1/models)
    vocab_size: int | None = None  # prompt token ids lie below this; None: the model's (32000 with url)
    replicas: int = 1  # engines in one simulated cluster (needs engines on virtual clocks)
    router: str = "round_robin"  # round_robin | least_loaded | prefix_affinity | a plugin's router
    out: str | None = None  # folder for replay.json and replay.png; None: the Hydra run (or sweep job) folder
    progress: bool = True  # a progress bar on stderr
    decode_runs: bool = True  # engine=sim: fold runs of decode steps between events into one pass (speculative=decode_runs)


@dataclass
class ProfileConfig:
    """`mode=profile`: time the engine's steps over a grid of shapes and fit the simulated
    engine's cost model to them (docs/simulator.md)."""

    out: str = "profile.json"
    prefill_tokens: list[int] = field(default_factory=lambda: [16, 64, 128, 256, 512, 1024, 2048])  # a prompt chunk's tokens
    prefill_context: list[int] = field(default_factory=lambda: [0, 512, 1536])  # cached tokens before the chunk
    decode_batch: list[int] = field(default_factory=lambda: [1, 4, 16, 32, 64])
    decode_context: list[int] = field(default_factory=lambda: [64, 256, 512])  # each decoding request's tokens
    mixed_batch: list[int] = field(default_factory=lambda: [4, 32])  # decoding requests beside a prompt chunk
    mixed_tokens: list[int] = field(default_factory=lambda: [64, 512])  # that chunk's tokens
    warmup_steps: int = 2  # untimed steps before each shape's timed ones (graph recording, caches)
    repeats: int = 3  # timed steps per shape
    serving_requests: int = 100  # then the engine serves this many of `replay`'s requests, every step timed (0: the grid only)
    serving_loads: list[float] = field(default_factory=lambda: [0.5, 0.9])  # arrival rates, as fractions of the capacity a burst measured
    validate_loads: list[float] = field(default_factory=list)  # then real against simulated at these fractions of the capacity (another seed)
    seed: int = 0  # the grid's prompt tokens and the serving runs' workload


@dataclass
class RunConfig:
    """What `python -m framework` does with the engine."""

    prompts: list[str] = field(
        default_factory=lambda: [
            "The capital of France is",
            "Write a haiku about the sea.",
            "What is 2 + 2?",
        ]
    )
    chat: bool = True  # wrap prompts in the checkpoint's chat template
    max_tokens: int = 48
    temperature: float = 0.0


# the dataclass of each config group that selects an implementation by name (see plugins/kinds.py)
GROUP_CONFIGS = {
    "scheduler": SchedulerConfig, "kv_cache": KVCacheConfig, "decoder": DecoderConfig, "engine": EngineConfig,
    "speculative": SpeculativeConfig,
}
# group -> (config dataclass, {kind: field holding the selected name})
GROUPS: dict[str, tuple[type, dict[str, str]]] = {
    group: (GROUP_CONFIGS[group], {kind.name: kind.field for kind in kinds}) for group, kinds in groups().items()
}


@dataclass
class FrameworkConfig:
    mode: str = "generate"  # generate | serve | bench | replay | profile
    model: ModelConfig = field(default_factory=ModelConfig)
    # typed by the selected option's own dataclass (see register_configs)
    scheduler: Any = None
    kv_cache: Any = None
    decoder: Any = None
    engine: Any = None
    speculative: Any = None
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: RunConfig = field(default_factory=RunConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def selected_config_fields(group: str, base: type, plugins) -> type:
    """The group's dataclass extended by the own settings of every implementation that one of its
    fields selects by name (`engine.backend=<name>`: a backend's settings are `engine` keys too, so
    `engine.cuda_graphs=false` works whichever backend runs, and only where that backend is installed)."""
    fields, owner = [], {f.name: f"{group} itself" for f in dataclasses.fields(base)}
    for kind in (k for k in KINDS.values() if k.group == group and not k.group_option):
        for entry in plugins[kind.name]:
            for f in dataclasses.fields(entry.config) if entry.config else ():
                if f.name in owner:
                    from framework.plugins.manager import PluginError

                    raise PluginError(
                        f"{kind.label} {entry.name!r} ({entry.provider}) declares the setting {group}.{f.name}, "
                        f"which {owner[f.name]} declares already"
                    )
                owner[f.name] = f"{kind.label} {entry.name!r} ({entry.provider})"
                fields.append((f.name, f.type, f))
    return dataclasses.make_dataclass(f"{base.__name__}_with_{group}_settings", fields, bases=(base,)) if fields else base


def framework_schema(plugins) -> type:
    """FrameworkConfig with `replay` extended by the own settings of every registered router."""
    replay = selected_config_fields("replay", ReplayConfig, plugins)
    if replay is ReplayConfig:
        return FrameworkConfig
    return dataclasses.make_dataclass(
        "FrameworkConfig_with_router_settings", [("replay", replay, field(default_factory=replay))], bases=(FrameworkConfig,)
    )


def _option_node(base: type, name_field: str, name: str, own_config: type | None) -> Any:
    """A config-group option: the group's dataclass with the implementation selected, extended by
    the implementation's own config dataclass (its fields sit flat in the group)."""
    if own_config is None:
        return base(**{name_field: name})
    cls = dataclasses.make_dataclass(
        f"{base.__name__}_{name}",
        [(f.name, f.type, f) for f in dataclasses.fields(own_config)],
        bases=(base,),
    )
    return cls(**{name_field: name})


def component_config(group_cfg: Any, own_config: type | None) -> Any:
    """The implementation's own settings, as an instance of its config dataclass."""
    if own_config is None:
        return None
    names = {f.name for f in dataclasses.fields(own_config)}
    return own_config(**{k: v for k, v in dict(group_cfg).items() if k in names})


def group_folder(search_path: str, group: str) -> tuple[str, Any]:
    """(where, folder) of config group `group` in a Hydra config search path: `pkg://a/b` (the
    package a.b; ModuleNotFoundError when it is not installed) or `file://dir` (or a bare dir)."""
    from importlib import resources
    from pathlib import Path

    if search_path.startswith("pkg://"):
        where = search_path[len("pkg://") :].replace("/", ".")
        return where, resources.files(where) / group
    where = search_path.removeprefix("file://")
    return where, Path(where) / group


def yaml_presets(group: str, plugins) -> dict[str, str]:
    """YAML options of `group` in the framework's conf/ and in plugins' search paths."""
    found: dict[str, str] = {}
    for path in ["pkg://framework.conf", *plugins.config_search_paths()]:
        try:
            where, folder = group_folder(path, group)
            names = [entry.name for entry in folder.iterdir() if entry.name.endswith(".yaml")]
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            found.setdefault(name[: -len(".yaml")], f"preset in {where}")
    return found


def group_options(group: str, plugins) -> dict[str, str]:
    """Every option of a config group, with who provides it."""
    options = {e.name: e.provider for kind in GROUPS.get(group, (None, {}))[1] for e in plugins[kind]}
    for name, provider in yaml_presets(group, plugins).items():
        options.setdefault(name, provider)
    return options


SWEEP_FUNCTIONS = ("choice(", "range(", "glob(", "interval(", "tag(", "sort(", "shuffle(")


def check_overrides(overrides: list[str], plugins) -> None:
    """Every implementation name an override selects (`scheduler=x`, `scheduler.capacity=x`,
    `resources.extra=[a,b]`, a sweep's `decoder=a,b`) must be installed: UnknownNameError lists the
    valid names and who provides each. The one place names are checked, before Hydra composes."""
    from framework.plugins.registry import UnknownNameError

    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or value.startswith(SWEEP_FUNCTIONS):
            continue
        if key in GROUPS or key == "model":
            options, label = group_options(key, plugins), key
        else:
            kind = next((k for k in KINDS.values() if k.group and f"{k.group}.{k.field}" == key), None)
            if kind is None:
                continue
            options = {**{name: "built in" for name in kind.reserved}, **{e.name: e.provider for e in plugins[kind.name]}}
            label = kind.label
        for name in _names(value):
            if name not in options:
                listing = ", ".join(f"{n} ({p})" for n, p in options.items()) or "none"
                raise UnknownNameError(f"unknown {label} {name!r}; available: {listing}")


def _names(value: str) -> list[str]:
    """The names in an override's value: `a`, `a,b` (a sweep) or `[a,b]` (a list)."""
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [part.strip().strip("'\"") for part in value.split(",") if part.strip()]


class _FrameworkSearchPath(SearchPathPlugin):
    """Adds the config search paths of installed plugins (their YAML presets)."""

    paths: list[str] = []

    def manipulate_search_path(self, search_path) -> None:
        for path in self.paths:
            search_path.append(provider="framework-plugin", path=path)


def register_configs(plugins) -> None:
    """Put every registered implementation into Hydra's ConfigStore as a group option."""
    cs = ConfigStore.instance()
    cs.store(name="framework_schema", node=framework_schema(plugins))
    for group, (base, name_fields) in GROUPS.items():
        base = selected_config_fields(group, base, plugins)
        seen: dict[str, str] = {}
        for kind in name_fields:
            for entry in plugins[kind]:
                if entry.name in seen:
                    from framework.plugins.manager import PluginError

                    raise PluginError(
                        f"{group} option {entry.name!r} is provided twice: as a {seen[entry.name]} and as a "
                        f"{kind.replace('_', ' ')} (by {entry.provider}); names must be unique within a group"
                    )
                seen[entry.name] = kind.replace("_", " ")
        for kind, name_field in name_fields.items():
            for entry in plugins[kind]:
                cs.store(
                    group=group,
                    name=entry.name,
                    node=_option_node(base, name_field, entry.name, entry.config),
                    provider=entry.provider,
                )
    _FrameworkSearchPath.paths = plugins.config_search_paths()
    hydra_plugins = HydraPlugins.instance()
    hydra_plugins.register(_FrameworkSearchPath)


def compose(overrides: list[str], plugins) -> Any:
    """Compose the same config the CLI would see for these overrides (used by the Python API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs(plugins)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="framework.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)
