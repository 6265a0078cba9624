"""A hardware description for the roofline: peak FLOP/s, memory bandwidth and memory, and what a
step sustains of them. Shipped as YAML in `conf/hardware/<name>.yaml`; a plugin adds its own in the
`hardware/` folder of its config search path."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path


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


def hardware_files(search_paths: list[str] = ()) -> dict[str, Path]:
    """name -> YAML file of every hardware description in the framework's conf/hardware/ and in
    the `hardware/` folder of each plugin config search path (the first of a name wins)."""
    import framework
    from framework.config import group_folder

    folders = []
    checkout = Path(framework.__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():  # a source tree: its own conf/, wherever an editable install maps framework.conf
        folders.append(checkout / "conf" / "hardware")
    for path in ["pkg://framework.conf", *search_paths]:
        try:
            folders.append(Path(str(group_folder(path, "hardware")[1])))
        except ModuleNotFoundError:
            continue
    found: dict[str, Path] = {}
    for folder in folders:
        for file in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            found.setdefault(file.stem, file)
    return found
