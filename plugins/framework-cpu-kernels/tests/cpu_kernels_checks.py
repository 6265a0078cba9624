"""What the kernel tests need of this machine, skipping (saying why) where it lacks it. (A module of
its own, not conftest: every plugin's tests folder has a `conftest` module.)"""

import os
import shutil

import pytest


def require_compiler() -> None:
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler (g++, c++ or $CXX): the cpu_kernels backend cannot build here")


def require_kernels(dtype=None):
    """The built kernels, running `dtype` (float32 if None) on this CPU; skips, saying why, where they
    cannot (no compiler, no AVX-512 / AVX512-BF16). A failed build with a compiler present fails."""
    import torch

    from framework_cpu_kernels.kernels import load

    require_compiler()
    kernels = load()
    assert kernels is not None, "the C++ kernels did not build although a compiler is present (see the log)"
    dtype = dtype or torch.float32
    if not kernels.supports(dtype, 64):
        pytest.skip(f"this CPU lacks {'AVX512-BF16' if dtype == torch.bfloat16 else 'AVX-512'}: the kernels do not run {dtype} here")
    return kernels
