"""The requests of one replay: when each arrives, its prompt token ids, how many tokens it must
generate and who sends it. Synthetic (arrival process + length distributions) or from a trace;
all of it follows from `replay.seed`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from framework.replay.arrivals import arrival_times, draw_lengths
from framework.replay.traces import MOONCAKE_BLOCK_TOKENS, TraceRecord, read_trace


@dataclass(frozen=True)
class ReplayRequest:
    arrival: float  # seconds from the start of the replay
    prompt_token_ids: list[int]
    output_len: int  # enforced: ignore_eos with max_tokens
    tenant: str | None = None
    priority: int | None = None


@dataclass
class Workload:
    requests: list[ReplayRequest]  # in arrival order
    description: dict = field(default_factory=dict)  # where it came from, and how lengths were scaled or clipped


def build_workload(cfg, token_ids: np.ndarray) -> Workload:
    """The requests `cfg` (the `replay` config) describes; prompt tokens are drawn from `token_ids`."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.trace:
        records = read_trace(cfg.trace, cfg.trace_format)
        records = sorted(records, key=lambda r: r.timestamp)[: cfg.num_requests]
        workload = _from_trace(cfg, records, token_ids, rng)
    else:
        workload = _synthetic(cfg, token_ids, rng)
    return with_tenants(workload, cfg.tenants, cfg.seed)


TENANT_STREAM = 1  # tenants are drawn from a generator of their own: adding them changes nothing else


def with_tenants(workload: Workload, tenants, seed: int) -> Workload:
    """Each request sent by a tenant drawn with probability share / total share, carrying its
    priority; `tenants` (TenantConfigs) empty: the workload as it is."""
    if not tenants:
        return workload
    names = [t.name for t in tenants]
    if not all(names) or len(set(names)) < len(names):
        raise ValueError(f"replay.tenants need distinct non-empty names; got {names}")
    shares = np.array([t.share for t in tenants], dtype=float)
    if not (shares > 0).all() or not np.isfinite(shares).all():
        raise ValueError(f"replay.tenants: every share must be a positive number; got {shares.tolist()}")
    drawn = np.random.default_rng([seed, TENANT_STREAM]).choice(len(tenants), len(workload.requests), p=shares / shares.sum())
    requests = [
        replace(r, tenant=tenants[i].name, priority=tenants[i].priority) for r, i in zip(workload.requests, drawn.tolist())
    ]
    described = ", ".join(
        f"{t.name} {share:.0%}" + ("" if t.priority is None else f" (priority {t.priority})") for t, share in zip(tenants, shares / shares.sum())
    )
    return Workload(requests, {**workload.description, "tenants": described})


def _synthetic(cfg, token_ids: np.ndarray, rng: np.random.Generator) -> Workload:
    n = cfg.num_requests
    if n is None or n < 1:
        raise ValueError(f"replay.num_requests must be at least 1 without a trace; got {n}")
    arrivals = arrival_times(n, cfg.rate, cfg.arrival, cfg.burstiness, rng)
    traces = {path: read_trace(path) for path in {_fit(cfg.input), _fit(cfg.output)} - {None}}  # (each read once)
    inputs = draw_lengths(cfg.input, n, rng, "replay.input", _fitted(cfg.input, traces, "input_len"))
    outputs = draw_lengths(cfg.output, n, rng, "replay.output", _fitted(cfg.output, traces, "output_len"))
    inputs, outputs, clipped = _clipped(cfg, inputs, outputs)
    requests = [
        ReplayRequest(float(t), rng.choice(token_ids, int(i)).tolist(), int(o)) for t, i, o in zip(arrivals, inputs, outputs)
    ]
    arrivals = "poisson" if cfg.arrival == "poisson" else f"gamma (burstiness {cfg.burstiness})"
    description = {"arrivals": arrivals, "rate": cfg.rate, "input": _dist(cfg.input), "output": _dist(cfg.output), **clipped}
    return Workload(requests, description)


def _fit(length_cfg) -> str | None:
    """The trace a lognormal's lengths are fitted to, if any."""
    return length_cfg.fit if length_cfg.dist == "lognormal" and length_cfg.fit else None


def _fitted(length_cfg, traces: dict, column: str):
    """The lengths of `length_cfg`'s fitted trace (records in `traces`), or None."""
    path = _fit(length_cfg)
    return None if path is None else [getattr(r, column) for r in traces[path]]


def _dist(length_cfg) -> str:
    if length_cfg.dist == "fixed":
        return f"fixed {length_cfg.value}"
    if length_cfg.dist == "lognormal":
        fit = f"fitted to {length_cfg.fit}" if length_cfg.fit else f"median {length_cfg.value}, sigma {length_cfg.sigma}"
        return f"lognormal {fit} in [{length_cfg.min}, {length_cfg.max}]"
    shape = f" a={length_cfg.zipf_a}" if length_cfg.dist == "zipf" else ""
    return f"{length_cfg.dist}{shape} in [{length_cfg.min}, {length_cfg.max}]"


def _clipped(cfg, inputs: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Lengths clipped to replay.max_input_len / max_output_len, and how many were."""
    counts = {}
    for key, lengths in (("max_input_len", inputs), ("max_output_len", outputs)):
        limit = getattr(cfg, key)
        if limit is not None:
            counts[f"{key.split('_')[1]}s_clipped"] = f"{int((lengths > limit).sum())} (to {limit})"
            lengths[lengths > limit] = limit
    return inputs, outputs, counts


def _from_trace(cfg, records: list[TraceRecord], token_ids: np.ndarray, rng: np.random.Generator) -> Workload:
    if not cfg.time_scale > 0:
        raise ValueError(f"replay.time_scale must be positive; got {cfg.time_scale}")
    if not cfg.length_scale > 0:
        raise ValueError(f"replay.length_scale must be positive; got {cfg.length_scale}")
    scale = cfg.length_scale
    inputs = np.array([max(1, round(r.input_len * scale)) for r in records], dtype=np.int64)
    outputs = np.array([max(1, round(r.output_len * scale)) for r in records], dtype=np.int64)
    inputs, outputs, clipped = _clipped(cfg, inputs, outputs)
    blocks = SharedBlocks(token_ids, cfg.seed, math.ceil(MOONCAKE_BLOCK_TOKENS * scale))  # ceil: blocks still cover the scaled prompt
    requests = []
    for record, n_in, n_out in zip(records, inputs.tolist(), outputs.tolist()):
        prompt = blocks.prompt(record.hash_ids, n_in) if record.hash_ids else rng.choice(token_ids, n_in).tolist()
        requests.append(ReplayRequest(record.timestamp * cfg.time_scale, prompt, n_out))
    description = {"trace": cfg.trace, "time_scale": cfg.time_scale, "length_scale": scale, **clipped}
    return Workload(requests, description)


class SharedBlocks:
    """Mooncake's prompt blocks as token ids: a hash id always becomes the same `block_tokens`
    tokens, so requests that share hash ids share those prompt blocks (and their KV cache)."""

    def __init__(self, token_ids: np.ndarray, seed: int, block_tokens: int):
        self.token_ids, self.seed, self.block_tokens = token_ids, seed, block_tokens
        self._blocks: dict[int, list[int]] = {}

    def block(self, hash_id: int) -> list[int]:
        if hash_id not in self._blocks:
            rng = np.random.default_rng([self.seed, hash_id])
            self._blocks[hash_id] = rng.choice(self.token_ids, self.block_tokens).tolist()
        return self._blocks[hash_id]

    def prompt(self, hash_ids, length: int) -> list[int]:
        """The first `length` tokens of the blocks (the reader checked that they cover the prompt)."""
        tokens: list[int] = []
        for hash_id in hash_ids:
            if len(tokens) >= length:
                break
            tokens += self.block(hash_id)
        return tokens[:length]
