"""When synthetic requests arrive and how long they are, drawn from a seeded numpy Generator."""

from __future__ import annotations

import math

import numpy as np

ARRIVALS = ("poisson", "gamma")
LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "zipf", "lognormal")


def arrival_times(n: int, rate: float, arrival: str, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """`n` arrival times in seconds, the first at 0. Gaps are exponential (`poisson`) or gamma
    with shape `burstiness` (`gamma`; shape 1 is Poisson, smaller is burstier), both of mean
    1/rate. `rate=inf` sends everything at once."""
    if arrival not in ARRIVALS:
        raise ValueError(f"replay.arrival must be one of {', '.join(ARRIVALS)}; got {arrival!r}")
    if not rate > 0:
        raise ValueError(f"replay.rate must be positive (requests/s; inf: all at once); got {rate}")
    if arrival == "gamma" and not burstiness > 0:
        raise ValueError(f"replay.burstiness must be positive; got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    if arrival == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    else:
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])[:n]


def fit_lognormal(lengths) -> tuple[float, float]:
    """(median, sigma) of the lognormal with the lengths' mean and spread of log length."""
    logs = np.log(np.maximum(np.asarray(lengths, dtype=float), 1.0))
    return float(np.exp(logs.mean())), float(logs.std())


def draw_lengths(cfg, n: int, rng: np.random.Generator, name: str, fitted_lengths=None) -> np.ndarray:
    """`n` lengths from the distribution `cfg` (a LengthConfig) names; `name` is its config key,
    for messages. A lognormal with `fit` takes its median and sigma from `fitted_lengths`."""
    if cfg.dist not in LENGTH_DISTRIBUTIONS:
        raise ValueError(f"{name}.dist must be one of {', '.join(LENGTH_DISTRIBUTIONS)}; got {cfg.dist!r}")
    if cfg.dist == "fixed":
        if cfg.value < 1:
            raise ValueError(f"{name}.value must be at least 1; got {cfg.value}")
        return np.full(n, cfg.value, dtype=np.int64)
    if not 1 <= cfg.min <= cfg.max:
        raise ValueError(f"{name}: need 1 <= min <= max; got min={cfg.min}, max={cfg.max}")
    if cfg.dist == "uniform":
        return rng.integers(cfg.min, cfg.max + 1, n)
    if cfg.dist == "zipf":  # truncated to [min, max]: P(min + k - 1) ~ k^-a, no mass piled on max
        if not cfg.zipf_a > 0:
            raise ValueError(f"{name}.zipf_a must be positive; got {cfg.zipf_a}")
        ranks = np.arange(1, cfg.max - cfg.min + 2)
        weights = ranks ** -float(cfg.zipf_a)
        return cfg.min - 1 + rng.choice(ranks, n, p=weights / weights.sum())
    median, sigma = fit_lognormal(fitted_lengths) if fitted_lengths is not None else (cfg.value, cfg.sigma)
    drawn = np.rint(np.exp(rng.normal(math.log(max(median, 1.0)), sigma, n)))
    return np.clip(drawn, cfg.min, cfg.max).astype(np.int64)
