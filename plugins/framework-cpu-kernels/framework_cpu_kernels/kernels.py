"""C++ kernels for CPUs (the sources in `csrc/`), compiled on first use with the system's C++
compiler and called through ctypes on tensors' memory: attention over the paged cache (a whole
step's decode rows and prompt chunks in one call, a prefix shared by every request attended once),
the fused steps of a decoder layer that PyTorch runs as many small ops (residual add + RMSNorm,
RoPE + KV cache write, SwiGLU), linear layers of up to `LINEAR_MAX_ROWS` rows (decode steps; `LINEAR_MAX_ROWS_TILES` by AMX) from
weights repacked once, and the argmax of greedy sampling. `framework_cpu_kernels.backend` serves
them as the `cpu_kernels` backend.

They need no PyTorch headers, so a build takes a few seconds; the shared library is cached under
`$FRAMEWORK_CACHE_DIR/kernels` (default `~/.cache/framework/kernels`), keyed by the sources, the
compiler and the CPU.
OpenMP loops run on PyTorch's own OpenMP runtime (the same `libgomp.so.1`, already loaded), so they
follow `torch.set_num_threads`. Each kernel rounds where the PyTorch ops it replaces round, so it
matches them (bit for bit except for the order of a sum). Without a compiler, or if the build
fails, `load()` returns None and `engine.backend=auto` takes another backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from framework.models.checkpoint import cache_dir as framework_cache_dir
from framework_cpu_kernels import huge_pages

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
HEADERS = sorted(CSRC.glob("*.h"))
# -ffp-contract=off: no fused multiply-adds where PyTorch rounds a product before adding it
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-fPIC"]
HEAD_DIMS = (16, 32, 64, 128)  # attention's compiled head sizes (`dispatch`)

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
SIGNATURES = {  # C function (without its dtype suffix): argument types
    "paged_attention": ([_P] * 7 + [_I] * 8 + [_F, _L], _I),
    "add_rms_norm": ([_P] * 4 + [_I, _I, _F], None),
    "silu_and_mul": ([_P, _P, _I, _I], None),
    "rope_and_cache": ([_P] * 5 + [_I] * 4 + [_L], None),
    "packed_linear": ([_P] * 4 + [_I] * 3, _I),
    "pack_linear_weight": ([_P, _P, _I, _I], None),
    "covered": ([], _I),
    "linear_tiles": ([_I], _I),
    "argmax": ([_P, _P, _I, _I], None),
}
LINEAR_MAX_ROWS = 128  # above it (prompt chunks) oneDNN multiplies as fast or faster...
LINEAR_MAX_ROWS_TILES = 512  # ...or above this where AMX tiles multiply (30 layers of SmolLM2: 25 against 34 ms at 256 rows, even at 512)
SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def cache_dir() -> Path:
    """`kernels/` in framework's cache directory (`$FRAMEWORK_CACHE_DIR`, default
    `~/.cache/framework`), else (one that is not writable) under the system's temporary directory."""
    root = framework_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root / "kernels"
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"framework-{os.getuid()}" / "kernels"


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
    key = hashlib.sha256(b"".join(s.read_bytes() for s in [*SOURCES, *HEADERS]))
    key.update(" ".join([compiler, *FLAGS]).encode() + _cpu_signature())
    library = cache_dir() / key.hexdigest()[:16] / "libframework_kernels.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # compile the sources in parallel, link beside the target and rename: concurrent builders
    # never see a half-written library
    work = Path(tempfile.mkdtemp(dir=library.parent))
    try:
        objects = [work / f"{source.stem}.o" for source in SOURCES]
        compiles = [[compiler, *FLAGS, "-c", str(s), "-o", str(o)] for s, o in zip(SOURCES, objects)]
        link = [compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(work / library.name)]
        for commands in (compiles, [link]):
            running = [(c, subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)) for c in commands]
            for command, process in running:
                _, errors = process.communicate()
                if process.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} failed:\n{errors[-2000:]}")
        os.replace(work / library.name, library)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return library


def _packed_size(in_features: int, out_features: int) -> int:
    """Values in a `pack_linear` weight: every input times the outputs rounded up to whole
    16-column vectors (linear.cpp's panels)."""
    return in_features * -(-out_features // 16) * 16


def _check(*tensors: torch.Tensor) -> None:
    """The kernels read raw memory: refuse anything but contiguous CPU tensors of one dtype."""
    dtype = tensors[0].dtype
    for t in tensors:  # (a plain loop: this runs a few hundred times per step)
        if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
            raise ValueError("CPU kernels need contiguous CPU tensors of one dtype")


class _Recording(threading.local):
    graph = None  # the CPU graph being recorded on this thread, if any


class CPUKernels:
    def __init__(self, library: Path):
        self.library = ctypes.CDLL(str(library))
        self._recording = _Recording()
        self._fns = {}
        self._max_rows = {}
        for name, (argtypes, restype) in SIGNATURES.items():
            for dtype, suffix in SUFFIXES.items():
                fn = getattr(self.library, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, restype
                self._fns[name, dtype] = fn

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """`x.argmax(dim=-1)` of a 2-D tensor, the same indices (the first of equal maxima, the first
        NaN) as int64."""
        _check(x)
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._call(self._fns["argmax", x.dtype], (x, out), x.shape[0], x.shape[1])
        return out

    def supports(self, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether the kernels run this model here: its dtype on this CPU (AVX-512, and AVX512-BF16
        for bfloat16) and its head size (one of HEAD_DIMS)."""
        return dtype in SUFFIXES and head_dim in HEAD_DIMS and bool(self._fns["covered", dtype]())

    def attention(self, q, k_cache, v_cache, block_tables, query_lens, context_lens, shared_blocks: int, scale: float):
        """Causal attention of a step's packed queries `q` `[tokens, heads, d]` (each request's run of
        `query_lens[i]` tokens, the last of which sees `context_lens[i]` positions) over the caches
        `[kv_heads, blocks, block_size, d]`; `block_tables` `[b, max_blocks]`, all three int32. The
        first `shared_blocks` table columns must hold the same blocks in every row. `q` may be a
        slice of a wider row (each token's heads contiguous). Returns `[tokens, heads, d]` (contiguous)."""
        num_kv_heads, num_blocks, block_size, head_dim = k_cache.shape
        if q.stride(2) != 1 or q.stride(1) != head_dim:
            q = q.contiguous()
        _check(k_cache, v_cache)
        if q.dtype != k_cache.dtype or not q.is_cpu:
            raise ValueError("CPU kernels need CPU tensors of one dtype")
        _check(block_tables, query_lens, context_lens)
        if block_tables.dtype != torch.int32:
            raise ValueError("attention needs int32 block tables, query and context lengths")
        out = q.new_empty(q.shape)
        status = self._call(
            self._fns["paged_attention", q.dtype],
            (q, k_cache, v_cache, out, block_tables, query_lens, context_lens),
            block_tables.shape[0], q.shape[1], num_kv_heads, num_blocks, block_size, head_dim, block_tables.shape[1],
            shared_blocks, scale, q.stride(0),
        )
        if status != 0:
            raise ValueError(f"attention does not cover {q.shape[1]} heads / {num_kv_heads} KV heads of {head_dim} in {q.dtype} here")
        return out

    def rms_norm(self, x, weight, eps: float, residual=None) -> torch.Tensor:
        """`weight * rmsnorm(x)`; with `residual`, first `residual += x` (in place) and the norm of that."""
        _check(x, weight, *([] if residual is None else [residual]))
        out = torch.empty_like(x)
        hidden = x.shape[-1]
        self._call(self._fns["add_rms_norm", x.dtype], (x, residual, weight, out), x.numel() // hidden, hidden, eps)
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU of a fused `[..., 2 * width]` gate|up projection: `[..., width]`."""
        _check(gate_up)
        width = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], width)
        self._call(self._fns["silu_and_mul", gate_up.dtype], (gate_up, out), gate_up.numel() // (2 * width), width)
        return out

    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor | None:
        """`weight` `[out, in]` repacked for `linear` (panels of 48 output columns, see linear.cpp);
        None where this CPU does not run its dtype (see `supports`) or its inputs do not fill whole words."""
        out_features, in_features = weight.shape
        if weight.dtype not in SUFFIXES or not self._fns["covered", weight.dtype]() or in_features % (4 // weight.element_size()):
            return None
        weight = weight.contiguous()
        _check(weight)
        packed = huge_pages.zeros((_packed_size(in_features, out_features),), weight.dtype)  # (read all over each step)
        self._fns["pack_linear_weight", weight.dtype](weight.data_ptr(), packed.data_ptr(), in_features, out_features)
        return packed

    def linear(self, x, packed: torch.Tensor, out_features: int, bias=None) -> torch.Tensor | None:
        """`F.linear` from a `pack_linear` weight for at most `max_rows(...)` rows; None for more
        rows or another dtype (the caller's matmul library takes those)."""
        in_features = x.shape[-1]
        if x.numel() > self.max_rows(x.dtype, in_features) * in_features or x.dtype != packed.dtype:
            return None
        if packed.numel() != _packed_size(in_features, out_features):  # (the kernel would read past it)
            raise ValueError(f"input of {in_features} features for a weight packed with another shape")
        x = x.contiguous()
        _check(x, *([] if bias is None else [bias]))
        out = x.new_empty(*x.shape[:-1], out_features)
        self._call(self._fns["packed_linear", x.dtype], (x, packed, bias, out), x.numel() // in_features, in_features, out_features)
        return out

    def max_rows(self, dtype: torch.dtype, in_features: int) -> int:
        """The most rows `linear` takes for inputs of `in_features` in `dtype`."""
        key = (dtype, in_features)
        if key not in self._max_rows:
            tiles = dtype in SUFFIXES and self._fns["linear_tiles", dtype](in_features)
            self._max_rows[key] = LINEAR_MAX_ROWS_TILES if tiles else LINEAR_MAX_ROWS
        return self._max_rows[key]

    def rope_and_cache(self, qkv, cos_sin, k_cache, v_cache, slots, num_heads: int, num_kv_heads: int) -> None:
        """Rotate the query and key heads of `qkv` `[T, (heads + 2 kv_heads) * d]` in place by the
        tokens' `cos_sin` `[T, 2, d]`, and write their keys and values to cache `slots` `[T]`."""
        _check(qkv, cos_sin, k_cache, v_cache)
        if slots.dtype != torch.int64 or not slots.is_contiguous():
            raise ValueError("rope_and_cache needs contiguous int64 slots")
        num_tokens, head_dim = qkv.shape[0], cos_sin.shape[-1]
        self._call(
            self._fns["rope_and_cache", qkv.dtype], (qkv, cos_sin, k_cache, v_cache, slots),
            num_tokens, num_heads, num_kv_heads, head_dim, k_cache[0].numel() // head_dim,
        )

    @contextlib.contextmanager
    def recording(self, graph):
        """Within it, this thread's kernel calls also go to `graph.add_kernel` (framework_cpu_kernels/graphs.py)."""
        self._recording.graph = graph
        try:
            yield
        finally:
            self._recording.graph = None

    def _call(self, fn, tensors, *sizes):
        """`fn` on the tensors' memory (None for a missing one), then the sizes; a recording graph
        keeps the call with the tensors (so that their memory stays theirs)."""
        args = (*(None if t is None else t.data_ptr() for t in tensors), *sizes)
        graph = self._recording.graph
        if graph is not None:
            graph.add_kernel(fn, args, tensors)
        return fn(*args)


_loaded: dict[str, CPUKernels | None] = {}  # the process's one load of the library


def load() -> CPUKernels | None:
    """The kernels, built on first use; None (logged once) where they cannot be built."""
    if "kernels" not in _loaded:
        try:
            _loaded["kernels"] = CPUKernels(build())
        except (OSError, RuntimeError) as error:
            logger.warning("CPU kernels unavailable (engine.backend=auto takes another backend): %s", error)
            _loaded["kernels"] = None
    return _loaded["kernels"]
