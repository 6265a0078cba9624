"""framework-cpu-kernels: the `cpu_kernels` backend (C++ kernels for CPUs with AVX-512), registered
through framework's hooks.

This module holds only hook implementations and must stay free of torch imports: plugin discovery
(`python -m framework --list-plugins`, `--help`) imports it. The backend itself is loaded lazily from
"framework_cpu_kernels.backend:CPUKernelsBackend" when the engine chooses a backend.
"""

from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_backends(register):
    from framework_cpu_kernels.config import CPUKernelsConfig  # a plain dataclass, no torch

    register("cpu_kernels", "framework_cpu_kernels.backend:CPUKernelsBackend", config=CPUKernelsConfig)
