"""A step-time model fitted to measured steps (`mode=profile`).

    seconds = f(tokens) + a * attended + c * context + s * sampled

`f` is piecewise linear in the step's token count, with a knot at each of a few measured token
counts (linear beyond the last): the linear layers stream their weights once a step however few
rows they multiply (a floor), then cost per row, at a rate that changes where kernels change
(the CPU kernels up to 128 rows, oneDNN past them). `a` prices the attention's (query, key)
pairs (prompt chunks), `c` each KV position read (decode rows), `s` each logits row (the LM head
and the decoder). Every parameter is a cost, so the fit is a non-negative least squares on
relative errors: a 2 ms decode step counts as much as a 200 ms prompt step.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass

import numpy as np

from framework.sim.cost_model import CostModel
from framework.sim.step_shape import StepShape

TERMS = ("attended", "context", "sampled")  # the StepShape fields priced linearly beside f(tokens)


@dataclass(frozen=True)
class FittedCostModel(CostModel):
    knots: tuple[int, ...]  # token counts, increasing
    at_knots: tuple[float, ...]  # f at each knot, in seconds
    per_term: tuple[float, ...]  # seconds per unit of each of TERMS
    source: str = "a fitted profile"

    def step_seconds(self, shape: StepShape) -> float:
        i, w = segment(shape.tokens, self.knots)
        f = self.at_knots[i] if w == 0.0 else (1.0 - w) * self.at_knots[i] + w * self.at_knots[i + 1]
        a, c, s = self.per_term
        return max(0.0, f + a * shape.attended + c * shape.context + s * shape.sampled)

    def decode_steps_seconds(self, batch, contexts):
        # `step_seconds` term by term in the same order, so the same floats
        i, w = segment(batch, self.knots)
        f = self.at_knots[i] if w == 0.0 else (1.0 - w) * self.at_knots[i] + w * self.at_knots[i + 1]
        a, c, s = self.per_term
        contexts = np.asarray(contexts, dtype=np.int64)
        return np.maximum(0.0, f + a * contexts + c * contexts + s * batch).tolist()

    def describe(self) -> str:
        return f"step times fitted to {self.source} ({len(self.knots)} knots up to {self.knots[-1]} tokens)"

    @classmethod
    def fit(cls, samples: list[tuple[StepShape, float]], max_knots: int = 12, source: str = "a fitted profile") -> FittedCostModel:
        if not samples:
            raise ValueError("no measured steps to fit a cost model to")
        knots = choose_knots([shape.tokens for shape, _ in samples], max_knots)
        rows = np.array([list(token_basis(shape.tokens, knots)) + [getattr(shape, t) for t in TERMS] for shape, _ in samples], dtype=float)
        seconds = np.array([s for _, s in samples], dtype=float)
        if (seconds <= 0).any():
            raise ValueError("measured step times must be positive")
        weighted = rows / seconds[:, None]  # relative errors: every row's target becomes 1
        scale = np.abs(weighted).max(axis=0)
        scale[scale == 0] = 1.0
        coef = nnls(weighted / scale, np.ones(len(samples))) / scale
        return cls(tuple(knots), tuple(coef[: len(knots)].tolist()), tuple(coef[len(knots) :].tolist()), source)

    def relative_errors(self, samples: list[tuple[StepShape, float]]) -> dict[str, float]:
        errors = [abs(self.step_seconds(shape) - s) / s for shape, s in samples]
        return {"mean": float(np.mean(errors)), "max": float(np.max(errors))}

    def to_dict(self) -> dict:
        return {"kind": "fitted", "knots": list(self.knots), "at_knots": list(self.at_knots), "per_term": dict(zip(TERMS, self.per_term))}

    @classmethod
    def from_dict(cls, data: dict, source: str) -> FittedCostModel:
        return cls(tuple(data["knots"]), tuple(data["at_knots"]), tuple(data["per_term"][t] for t in TERMS), source)


def token_basis(tokens: int, knots) -> np.ndarray:
    """Hat functions over `knots` at `tokens`: f(tokens) = at_knots . basis."""
    basis = np.zeros(len(knots))
    i, w = segment(tokens, knots)
    basis[i] = 1.0 - w
    if w:
        basis[i + 1] = w
    return basis


def segment(tokens: int, knots) -> tuple[int, float]:
    """(i, w): `tokens` lies at the fraction w of the way from knots[i] to knots[i + 1]. Outside
    the knots the end segment goes on (w < 0 or w > 1); with one knot, (0, 0.0)."""
    if len(knots) == 1:
        return 0, 0.0
    i = min(max(bisect_right(knots, tokens) - 1, 0), len(knots) - 2)
    return i, (tokens - knots[i]) / (knots[i + 1] - knots[i])


def choose_knots(tokens: list[int], max_knots: int) -> list[int]:
    """Knots for f among the measured token counts: those measured at least twice (a count seen at
    one shape only, such as a mixed step's, would let f bend to that one step and hide how the
    other terms add up), and the smallest and largest; at most `max_knots`, spread evenly on a log
    scale."""
    seen = Counter(tokens)
    values = sorted({t for t, n in seen.items() if n >= 2} | {min(seen), max(seen)})
    if len(values) <= max_knots:
        return values
    targets = np.geomspace(values[0], values[-1], max_knots)
    logs = np.log(values)
    return sorted({values[int(np.argmin(np.abs(logs - np.log(t))))] for t in targets})


def held_out_errors(samples: list[tuple[StepShape, float]], max_knots: int = 12, folds: int = 10) -> dict[str, float]:
    """Relative errors of each sample predicted by a model fitted to the samples outside its fold
    (sample i is in fold i % folds): how well the fit predicts shapes it was not given."""
    errors = []
    for fold in range(min(folds, len(samples))):
        given = [sample for i, sample in enumerate(samples) if i % folds != fold]
        if given:
            model = FittedCostModel.fit(given, max_knots)
            errors += [abs(model.step_seconds(shape) - s) / s for shape, s in samples[fold::folds]]
    return {"mean": float(np.mean(errors)), "max": float(np.max(errors))} if errors else {}


def nnls(a: np.ndarray, b: np.ndarray, max_iterations: int | None = None) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method)."""
    n = a.shape[1]
    x = np.zeros(n)
    free = np.zeros(n, dtype=bool)  # the variables not held at zero
    tolerance = 10 * np.finfo(float).eps * max(a.shape) * max(1.0, np.abs(a).sum(axis=0).max())
    for _ in range(max_iterations or 3 * n):
        gradient = a.T @ (b - a @ x)
        if free.all() or (gradient[~free] <= tolerance).all():
            break
        free[np.argmax(np.where(free, -np.inf, gradient))] = True
        while True:
            z = np.zeros(n)
            z[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
            if (z[free] > tolerance).all():
                x = z
                break
            shrinking = free & (z <= tolerance)
            gap = x[shrinking] - z[shrinking]
            step = float(np.min(np.divide(x[shrinking], gap, out=np.zeros_like(gap), where=gap > 0)))
            x = x + step * (z - x)
            free &= x > tolerance
            x[~free] = 0.0
    return x
