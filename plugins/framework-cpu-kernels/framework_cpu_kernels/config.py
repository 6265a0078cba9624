"""The `cpu_kernels` backend's settings: keys of the `engine` config group where the plugin is installed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CPUKernelsConfig:
    cpu_graphs: bool = True  # replay decode-only steps from recorded kernel calls (framework_cpu_kernels/graphs.py)
