"""The C++ CPU kernels (framework/kernels): build and cache, accuracy against a float64
reference, refusals; the engine-level equivalence is in tests/integration/test_fast_paths.py."""

import ctypes

import pytest
import torch

from framework.kernels import cpu


@pytest.fixture(scope="module")
def kernels():
    loaded = cpu.load()
    assert loaded is not None, "the C++ kernels did not build on this machine (see the log)"
    return loaded


def reference(q, k_cache, v_cache, tables, lengths, scale):
    """Per request and head, softmax(q . K^T * scale) V in float64 over the first `length` slots of
    the request's blocks."""
    num_kv_heads, _, block_size, _ = k_cache.shape
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, length in enumerate(lengths.tolist()):
        positions = torch.arange(length)
        blocks = tables[b].long()[positions // block_size]
        for h in range(q.shape[1]):
            keys = k_cache[h // group, blocks, positions % block_size].double()
            values = v_cache[h // group, blocks, positions % block_size].double()
            out[b, h] = torch.softmax(keys @ q[b, h].double() * scale, dim=0) @ values
    return out


def random_case(dtype, head_dim, batch=5, heads=6, kv_heads=2, block_size=8, num_blocks=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
    lengths = torch.tensor([1, 8, 9, 37, 60][:batch], dtype=torch.int32)  # block edges and a lone token
    width = -(-int(lengths.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in range(batch)]).to(torch.int32)
    return q, k_cache, v_cache, tables, lengths


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_float32_matches_float64_reference(kernels, head_dim):
    q, k, v, tables, lengths = random_case(torch.float32, head_dim)
    out = kernels.decode_attention(q, k, v, tables, lengths, head_dim**-0.5)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, tables, lengths, head_dim**-0.5), rtol=1e-5, atol=1e-5)


def test_bfloat16_is_float64_rounded_once(kernels):
    # The kernel computes in float32 from the bf16 inputs and rounds only its output, so it is
    # within one bf16 rounding (2^-8 relative) of the exact result on the same inputs.
    q, k, v, tables, lengths = random_case(torch.bfloat16, 64, seed=1)
    out = kernels.decode_attention(q, k, v, tables, lengths, 0.125)
    assert out.dtype == torch.bfloat16
    want = reference(q, k, v, tables, lengths, 0.125)
    torch.testing.assert_close(out.double(), want, rtol=2**-8, atol=1e-3)


def test_softmax_is_stable_for_large_scores(kernels):
    q, k, v, tables, lengths = random_case(torch.float32, 64, seed=2)
    out = kernels.decode_attention(q * 300, k, v, tables, lengths, 1.0)  # scores in the thousands
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference(q * 300, k, v, tables, lengths, 1.0), rtol=1e-4, atol=1e-4)


def test_refuses_what_it_does_not_cover(kernels):
    q, k, v, tables, lengths = random_case(torch.float32, 64)
    assert not kernels.supports(torch.float32, 48) and not kernels.supports(torch.float16, 64)
    with pytest.raises(ValueError, match="int32"):
        kernels.decode_attention(q, k, v, tables.long(), lengths, 0.125)
    with pytest.raises(ValueError, match="dtype"):
        kernels.decode_attention(q, k.bfloat16(), v, tables, lengths, 0.125)
    q48, k48, v48, tables48, lengths48 = random_case(torch.float32, 48)
    with pytest.raises(ValueError, match="does not cover"):
        kernels.decode_attention(q48, k48, v48, tables48, lengths48, 0.125)


def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEWORK_CACHE", str(tmp_path))
    first = cpu.build()
    assert first.is_file() and first.is_relative_to(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu.build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    extra = tmp_path / "extra.cpp"
    extra.write_text('extern "C" int framework_test_marker() { return 7; }\n')
    monkeypatch.setattr(cpu, "SOURCES", [*cpu.SOURCES, extra])
    rebuilt = cpu.build()
    assert rebuilt != first and ctypes.CDLL(str(rebuilt)).framework_test_marker() == 7


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEWORK_CACHE", str(tmp_path))
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu, "SOURCES", [broken])
    with pytest.raises(RuntimeError, match="failed"):
        cpu.build()
    assert not list(tmp_path.rglob("*.so"))  # no half-built library left to be picked up
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        cpu.build()
