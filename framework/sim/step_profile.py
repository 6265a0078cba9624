"""A profile file: the steps `mode=profile` timed on one machine, and the model fitted to them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from framework.sim.fitted_cost import FittedCostModel, held_out_errors
from framework.sim.model_shape import ModelShape
from framework.sim.step_shape import StepShape

FORMAT = "framework-step-profile/1"


@dataclass
class StepProfile:
    model_shape: ModelShape
    device: str  # where the steps ran, e.g. "cpu", "cuda:0"
    dtype: str  # of weights and KV cache, e.g. "bfloat16"
    memory_bytes: int  # the device's memory (the KV cache is sized from a share of it)
    samples: list[tuple[StepShape, float]]  # (shape, seconds) of every timed step
    setup: dict = field(default_factory=dict)  # backend, threads, scheduler budgets: for the record
    cost_model: FittedCostModel | None = None
    errors: dict = field(default_factory=dict)  # the fit's relative errors: on the samples, and on each left out of it

    def fitted(self, max_knots: int = 12) -> StepProfile:
        self.cost_model = FittedCostModel.fit(self.samples, max_knots, source="a profile")
        self.errors = {"fit": self.cost_model.relative_errors(self.samples), "held_out": held_out_errors(self.samples, max_knots)}
        return self

    def save(self, path: str | Path) -> None:
        data = {
            "format": FORMAT,
            "model": self.model_shape.to_dict(),
            "device": self.device,
            "dtype": self.dtype,
            "memory_bytes": self.memory_bytes,
            "setup": self.setup,
            "cost_model": self.cost_model.to_dict() if self.cost_model else None,
            "relative_errors": self.errors,
            "samples": [{**shape.to_dict(), "seconds": seconds} for shape, seconds in self.samples],
        }
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> StepProfile:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the profile {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a profile written by `python -m framework mode=profile` ({FORMAT})")
        samples = [(StepShape(**{k: v for k, v in s.items() if k != "seconds"}), s["seconds"]) for s in data["samples"]]
        profile = cls(ModelShape(**data["model"]), data["device"], data["dtype"], data["memory_bytes"], samples, data.get("setup", {}))
        if not data.get("cost_model"):
            return profile.fitted()
        profile.cost_model = FittedCostModel.from_dict(data["cost_model"], source=f"the profile {path.name} ({data['device']}, {data['dtype']})")
        profile.errors = data.get("relative_errors", {})
        return profile
