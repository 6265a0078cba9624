"""C++ kernels for CPUs, compiled on first use with the system's C++ compiler and called through
ctypes on tensors' memory.

They need no PyTorch headers, so a build takes about a second; the shared library is cached under
`$FRAMEWORK_CACHE` (default `~/.cache/framework`), keyed by the source, the compiler and the CPU.
OpenMP parallel loops run on PyTorch's own OpenMP runtime (the same `libgomp.so.1`, already loaded),
so they follow `torch.set_num_threads`. Without a compiler, or if the build fails, `load()` returns
None and callers keep their PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("decode_attention.cpp")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
_INT, _PTR = ctypes.c_int, ctypes.c_void_p


def cache_dir() -> Path:
    return Path(os.environ.get("FRAMEWORK_CACHE") or Path.home() / ".cache" / "framework") / "kernels"


def _cpu_signature() -> bytes:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).encode()
    except (OSError, StopIteration):
        return b""


def build() -> Path:
    """Compile the kernels (unless an identical build is cached) and return the library's path."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + compiler.encode() + " ".join(FLAGS).encode())
    key.update(_cpu_signature())
    library = cache_dir() / key.hexdigest()[:16] / "libframework_kernels.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent builders never see a half-written library
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        command = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    return library


class CPUKernels:
    def __init__(self, library: Path):
        self.library = ctypes.CDLL(str(library))
        self._decode = {}
        for dtype, name in [(torch.float32, "decode_attention_f32"), (torch.bfloat16, "decode_attention_bf16")]:
            fn = getattr(self.library, name)
            fn.argtypes = [_PTR] * 6 + [_INT] * 7 + [ctypes.c_float]
            fn.restype = _INT
            self._decode[dtype] = fn

    HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # compiled in: decode_attention.cpp, `dispatch`

    def supports(self, dtype: torch.dtype, head_dim: int) -> bool:
        return dtype in self._decode and head_dim in self.HEAD_DIMS

    def decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
        """One query per request: q `[b, heads, d]`; caches `[kv_heads, blocks, block_size, d]`;
        block_tables `[b, max_blocks]` and context_lens `[b]` int32. Returns `[b, heads, d]`."""
        q = q.contiguous()
        batch, num_heads, head_dim = q.shape
        num_kv_heads, num_blocks, block_size, _ = k_cache.shape
        if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == q.dtype == v_cache.dtype):
            raise ValueError("decode_attention needs contiguous caches of the query's dtype")
        if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32 or not block_tables.is_contiguous():
            raise ValueError("decode_attention needs contiguous int32 block tables and context lengths")
        out = torch.empty_like(q)
        status = self._decode[q.dtype](
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
            block_tables.data_ptr(), context_lens.data_ptr(),
            batch, num_heads, num_kv_heads, num_blocks, block_size, head_dim, block_tables.shape[1], scale,
        )
        if status != 0:
            raise ValueError(f"decode_attention does not cover {num_heads} heads / {num_kv_heads} KV heads of {head_dim}")
        return out


_loaded: dict[str, CPUKernels | None] = {}


def load() -> CPUKernels | None:
    """The kernels, built on first use; None (logged once) where they cannot be built."""
    if "kernels" not in _loaded:
        try:
            _loaded["kernels"] = CPUKernels(build())
        except (OSError, RuntimeError) as error:
            logger.warning("CPU kernels unavailable, using the PyTorch paths: %s", error)
            _loaded["kernels"] = None
    return _loaded["kernels"]
