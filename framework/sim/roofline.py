"""A roofline prediction of step times from a model's sizes and a hardware description, for
hardware nobody has profiled. Each part of a step takes the longer of its arithmetic at the
hardware's sustained FLOP/s and its memory traffic at the sustained bandwidth:

- the decoder layers' linear layers: 2 FLOPs per weight per token; their weights read once;
- the LM head: the same, for the sampled rows only;
- attention: 4 FLOPs per (query, key) pair per head and dimension (scores and the weighted sum);
  each request's K and V read once;

plus a fixed host time per step (scheduling, metadata, launches). Activations are ignored.
Figures from it are predictions, never measurements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from framework.sim.cost_model import CostModel
from framework.sim.model_shape import ModelShape
from framework.sim.step_shape import StepShape


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense FLOP/s in the model's dtype
    memory_bandwidth: float  # bytes/s
    memory_bytes: int  # device memory (the KV cache is sized from a share of it)
    flops_efficiency: float = 0.5  # share of the peak a large matmul sustains
    bandwidth_efficiency: float = 0.8  # share of the bandwidth a streaming read sustains
    step_overhead: float = 0.0  # seconds of host work per step (scheduler, metadata, launches)

    @classmethod
    def load(cls, name_or_path: str, search_paths: list[str] = ()) -> Hardware:
        """`conf/hardware/<name>.yaml` (of the framework or a plugin's config search path), or a
        YAML file's path."""
        from omegaconf import OmegaConf

        path = Path(name_or_path).expanduser()
        if not (path.suffix in (".yaml", ".yml") and path.is_file()):
            found = hardware_files(search_paths)
            if name_or_path not in found:
                raise ValueError(f"unknown hardware {name_or_path!r}; available: {', '.join(sorted(found)) or 'none'} (or a YAML file's path)")
            path = found[name_or_path]
        data = OmegaConf.to_container(OmegaConf.load(path))
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown hardware keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{"name": path.stem, **data})

    def to_dict(self) -> dict:
        return asdict(self)


def hardware_files(search_paths: list[str] = ()) -> dict[str, Path]:
    """name -> YAML file of every hardware description in the framework's conf/hardware/ and in
    the `hardware/` folder of each plugin config search path (the first of a name wins)."""
    from importlib import resources

    import framework

    folders = []
    checkout = Path(framework.__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():  # a source tree: its own conf/, wherever an editable install maps framework.conf
        folders.append(checkout / "conf" / "hardware")
    for where in ["pkg://framework.conf", *search_paths]:
        if where.startswith("pkg://"):
            try:
                folders.append(Path(str(resources.files(where[len("pkg://") :].replace("/", ".")))) / "hardware")
            except ModuleNotFoundError:
                continue
        else:
            folders.append(Path(where.removeprefix("file://")) / "hardware")
    found: dict[str, Path] = {}
    for folder in folders:
        for file in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            found.setdefault(file.stem, file)
    return found


@dataclass(frozen=True)
class RooflineCostModel(CostModel):
    model_shape: ModelShape
    hardware: Hardware
    bytes_per_value: int  # of weights and KV cache entries (2 for bfloat16)
    is_prediction = True

    def step_seconds(self, shape: StepShape) -> float:
        m, b = self.model_shape, self.bytes_per_value
        flops_rate = self.hardware.peak_flops * self.hardware.flops_efficiency
        byte_rate = self.hardware.memory_bandwidth * self.hardware.bandwidth_efficiency

        def part(flops: float, bytes_moved: float) -> float:
            return max(flops / flops_rate, bytes_moved / byte_rate)

        seconds = part(m.layer_flops(shape.tokens), m.layer_weights * b)
        if shape.sampled:
            seconds += part(m.lm_head_flops(shape.sampled), m.lm_head_weights * b)
        seconds += part(m.attention_flops(shape.attended), m.kv_values_per_token * b * shape.context)
        return seconds + self.hardware.step_overhead

    def describe(self) -> str:
        h = self.hardware
        return (
            f"PREDICTED step times: a roofline of {h.name} ({h.peak_flops / 1e12:.0f} TFLOP/s x {h.flops_efficiency:.0%}, "
            f"{h.memory_bandwidth / 1e9:.0f} GB/s x {h.bandwidth_efficiency:.0%}, {h.step_overhead * 1e3:.1f} ms a step on the host)"
        )
