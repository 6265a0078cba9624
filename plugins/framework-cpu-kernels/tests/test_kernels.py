"""The C++ CPU kernels (framework_cpu_kernels/kernels.py): build and cache, accuracy against a
float64 reference and against the `torch` backend's ops they replace, refusals; the engine-level
equivalence is in test_backend.py and framework's tests/integration (run on `auto`)."""

import ctypes

import pytest
import torch
from cpu_kernels_checks import require_kernels

from framework_cpu_kernels import kernels as cpu


def reference(q, k_cache, v_cache, tables, query_lens, context_lens, scale):
    """Per request, query token and head, softmax(q . K^T * scale) V in float64 over the positions
    the token sees (causal), read from the request's blocks."""
    num_kv_heads, _, block_size, _ = k_cache.shape
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    token = 0
    for b, (n, context) in enumerate(zip(query_lens.tolist(), context_lens.tolist())):
        for i in range(n):
            positions = torch.arange(context - n + i + 1)
            blocks = tables[b].long()[positions // block_size]
            for h in range(q.shape[1]):
                keys = k_cache[h // group, blocks, positions % block_size].double()
                values = v_cache[h // group, blocks, positions % block_size].double()
                out[token, h] = torch.softmax(keys @ q[token, h].double() * scale, dim=0) @ values
            token += 1
    return out


# (query tokens, context) per request: decode rows at block edges and a lone token, a whole
# prompt, a chunk in the middle of one
MIXED = [(1, 1), (1, 8), (1, 9), (5, 37), (1, 60), (24, 24), (7, 50)]


def random_case(dtype, head_dim, shapes=MIXED, heads=6, kv_heads=2, block_size=8, num_blocks=64, shared=0, seed=0):
    """Caches filled with NaN except where some request's context lies (the kernel must not read
    anything else), queries, and block tables whose first `shared` columns are the same blocks."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.full((kv_heads, num_blocks, block_size, head_dim), float("nan")).to(dtype)
    v_cache = k_cache.clone()
    query_lens = torch.tensor([n for n, _ in shapes], dtype=torch.int32)
    context_lens = torch.tensor([c for _, c in shapes], dtype=torch.int32)
    width = -(-int(context_lens.max()) // block_size)
    order = torch.randperm(num_blocks, generator=g)
    prefix, rest = order[:shared], order[shared:].tolist()
    tables = torch.stack([torch.cat([prefix, torch.tensor([rest.pop() for _ in range(width - shared)], dtype=torch.long)]) for _ in shapes])
    for b, (_, context) in enumerate(shapes):
        positions = torch.arange(context)
        blocks, offsets = tables[b][positions // block_size], positions % block_size
        for cache in (k_cache, v_cache):
            if b == 0 or not shared:
                cache[:, blocks, offsets] = torch.randn(kv_heads, context, head_dim, generator=g).to(dtype)
            else:  # the shared prefix was written by request 0
                own = positions >= shared * block_size
                cache[:, blocks[own], offsets[own]] = torch.randn(kv_heads, int(own.sum()), head_dim, generator=g).to(dtype)
    q = torch.randn(int(query_lens.sum()), heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables.to(torch.int32), query_lens, context_lens


def attend(kernels, case, scale, shared=0):
    return kernels.attention(*case, shared, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_len", [2, 5])
def test_a_rows_output_does_not_depend_on_the_other_rows(kernels, dtype, query_len):
    """A verify step's row equals the decode step of the same token, bit for bit: speculative
    decoding then gives exactly the tokens of plain decoding."""
    require_kernels(dtype)
    g = torch.Generator().manual_seed(query_len)
    heads, kv_heads, d, block_size = 9, 3, 64, 16  # SmolLM2's attention
    k_cache, v_cache = (torch.randn(kv_heads, 48, block_size, d, generator=g).to(dtype) for _ in range(2))
    table = torch.randperm(48, generator=g)[:40].to(torch.int32)[None]
    one = torch.ones(1, dtype=torch.int32)
    for context in range(query_len, 640, 13):
        q = torch.randn(query_len, heads, d, generator=g).to(dtype)
        rows = kernels.attention(q, k_cache, v_cache, table, one * query_len, one * context, 0, 0.125)
        for i in range(query_len):
            alone = kernels.attention(q[i : i + 1].contiguous(), k_cache, v_cache, table, one, one * (context - query_len + 1 + i), 0, 0.125)
            assert torch.equal(alone[0], rows[i]), (context, i)


@pytest.mark.parametrize("block_size", [8, 16, 32])  # a tile is a whole block, or 16 keys of one
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_float32_matches_float64_reference(kernels, head_dim, block_size):
    case = random_case(torch.float32, head_dim, block_size=block_size)
    out = attend(kernels, case, head_dim**-0.5)
    assert out.dtype == torch.float32 and out.shape == case[0].shape
    torch.testing.assert_close(out.double(), reference(*case, head_dim**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2), (8, 2), (10, 2)])  # groups 1-5
def test_every_query_group_size(kernels, heads, kv_heads):
    case = random_case(torch.float32, 64, heads=heads, kv_heads=kv_heads, block_size=16, seed=4)
    torch.testing.assert_close(attend(kernels, case, 0.125).double(), reference(*case, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [8, 16])
def test_bfloat16_is_float64_rounded_once(kernels, block_size):
    require_kernels(torch.bfloat16)
    # float32 math on the bf16 inputs, only the output rounded: within one bf16 rounding (2^-8
    # relative) of the exact result on the same inputs
    case = random_case(torch.bfloat16, 64, block_size=block_size, seed=1)
    out = attend(kernels, case, 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(*case, 0.125), rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_shared_prefix_attended_once_gives_the_same_result(kernels, dtype):
    require_kernels(dtype)
    shapes = [(1, 70), (1, 65), (12, 80), (3, 49), (1, 64)]  # 4 shared blocks of 16, every row past them
    case = random_case(dtype, 64, shapes=shapes, block_size=16, shared=4, seed=5)
    once, per_request = attend(kernels, case, 0.125, shared=4), attend(kernels, case, 0.125)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-3)
    torch.testing.assert_close(once.double(), reference(*case, 0.125), **tolerance)
    torch.testing.assert_close(once.double(), per_request.double(), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,block_size", [(16, 8), (64, 16), (128, 32)])
def test_rows_that_see_the_whole_shared_prefix(kernels, dtype, head_dim, block_size):
    require_kernels(dtype)
    # every row past the shared blocks (scored in one pass, bfloat16 weights rounded for the value
    # sums): decode rows, a prompt chunk, a row whose last key ends the prefix; more rows than a
    # task holds, so that both threads take some
    shared = 48 // block_size
    shapes = [(1, 50), (1, 49), (9, 64), (1, 48), (14, 70)]
    case = random_case(dtype, head_dim, shapes=shapes, heads=9, kv_heads=3, block_size=block_size, num_blocks=96, shared=shared, seed=7)
    once, per_request = attend(kernels, case, 0.125, shared=shared), attend(kernels, case, 0.125)
    # bfloat16: the weights rounded for the value sums, as in PyTorch's flash attention (whose
    # bfloat16 SDPA is off by up to 7.5e-3 on this case too), and per request a different rounding
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-3)
    torch.testing.assert_close(once.double(), reference(*case, 0.125), **tolerance)
    torch.testing.assert_close(once.double(), per_request.double(), **tolerance)


def test_a_shared_prefix_longer_than_a_rows_context_stays_causal(kernels):
    # a prompt chunk whose first rows sit inside the shared blocks: they must not see later keys
    shapes = [(40, 40), (1, 50), (1, 41)]
    case = random_case(torch.float32, 64, shapes=shapes, block_size=8, shared=5, seed=6)
    torch.testing.assert_close(attend(kernels, case, 0.125, shared=5).double(), reference(*case, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_queries_may_be_a_slice_of_a_wider_row(kernels, dtype):
    require_kernels(dtype)
    q, *rest = random_case(dtype, 64, seed=4)
    qkv = torch.cat([q.flatten(1), torch.randn(len(q), 2 * 64, dtype=dtype)], dim=1)  # as in a fused QKV output
    sliced = qkv[:, : q[0].numel()].view(q.shape)
    assert not sliced.is_contiguous()
    out = kernels.attention(sliced, *rest, 0, 0.125)
    assert out.is_contiguous()
    assert torch.equal(out, kernels.attention(q, *rest, 0, 0.125))


def test_softmax_is_stable_for_large_scores(kernels):
    q, *rest = random_case(torch.float32, 64, seed=2)
    out = kernels.attention(q * 300, *rest, 0, 1.0)  # scores in the thousands
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference(q * 300, *rest, 1.0), rtol=1e-4, atol=1e-4)


def test_refuses_what_it_does_not_cover(kernels):
    q, k, v, tables, query_lens, context_lens = random_case(torch.float32, 64)
    assert not kernels.supports(torch.float32, 48) and not kernels.supports(torch.float16, 64)
    with pytest.raises(ValueError, match="int32"):
        kernels.attention(q, k, v, tables.long(), query_lens.long(), context_lens.long(), 0, 0.125)
    with pytest.raises(ValueError, match="dtype"):
        kernels.attention(q, k.bfloat16(), v, tables, query_lens, context_lens, 0, 0.125)
    with pytest.raises(ValueError, match="does not cover"):
        kernels.attention(*random_case(torch.float32, 48), 0, 0.125)


def test_build_is_cached_and_keyed_by_source(compiler, tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEWORK_CACHE_DIR", str(tmp_path))
    first = cpu.build()
    assert first.is_file() and first.is_relative_to(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu.build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    extra = tmp_path / "extra.cpp"
    extra.write_text('extern "C" int framework_test_marker() { return 7; }\n')
    monkeypatch.setattr(cpu, "SOURCES", [*cpu.SOURCES, extra])
    rebuilt = cpu.build()
    assert rebuilt != first and ctypes.CDLL(str(rebuilt)).framework_test_marker() == 7


def test_a_failed_build_says_why(compiler, tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEWORK_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu, "SOURCES", [broken])
    with pytest.raises(RuntimeError, match="failed"):
        cpu.build()
    assert not list(tmp_path.rglob("*.so"))  # no half-built library left to be picked up
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        cpu.build()


# ---- the fused layer steps against the PyTorch ops they replace -----------------------------

DTYPES = [torch.float32, torch.bfloat16]


def ulps(dtype):
    """One unit in the last place at 1.0 (relative rounding step) of the dtype."""
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(kernels, dtype):
    from framework.layers.norm import rms_norm

    g = torch.Generator().manual_seed(3)
    weight = (torch.rand(576, generator=g) + 0.5).to(dtype)
    x = torch.randn(7, 576, generator=g).to(dtype)
    residual = torch.randn(7, 576, generator=g).to(dtype)
    want = rms_norm(x, weight, 1e-5)
    want_sum = x + residual
    want_sum_norm = rms_norm(want_sum, weight, 1e-5)
    got = kernels.rms_norm(x, weight, 1e-5)
    got_sum = residual.clone()
    got_sum_norm = kernels.rms_norm(x, weight, 1e-5, got_sum)  # adds x into got_sum in place
    assert torch.equal(got_sum, want_sum)  # x + residual, rounded the same way
    # the sum of squares is taken in another order: the scale may move by an ulp, then two products
    for a, b in [(got, want), (got_sum_norm, want_sum_norm)]:
        torch.testing.assert_close(a.float(), b.float(), rtol=4 * ulps(dtype), atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(kernels, dtype):
    from framework.layers.activation import silu_and_mul

    gate_up = (torch.randn(5, 2 * 1536, generator=torch.Generator().manual_seed(4)) * 4).to(dtype)
    want = silu_and_mul(gate_up)
    got = kernels.silu_and_mul(gate_up)
    assert got.shape == want.shape and got.dtype == dtype
    # e^x by a polynomial instead of the vector library's: a few float32 ulps before rounding
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulps(dtype), atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_matches_torch(kernels, dtype):
    from framework.layers.attention import write_kv_cache
    from framework.layers.rotary import RotaryEmbedding, apply_rotary

    heads, kv_heads, d, tokens = 9, 3, 64, 6
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    positions = torch.tensor([0, 1, 17, 300, 301, 2047])
    cos_sin = RotaryEmbedding(d, 4096, {"rope_theta": 10000.0, "rope_type": "default"})(positions, dtype)
    slots = torch.tensor([3, 9, 40, 41, 0, 63])
    caches = [torch.zeros(kv_heads, 8, 8, d, dtype=dtype) for _ in range(2)]
    want_caches = [c.clone() for c in caches]

    qk = apply_rotary(qkv[:, : (heads + kv_heads) * d].view(tokens, -1, d), cos_sin)
    v = qkv[:, (heads + kv_heads) * d :].view(tokens, kv_heads, d)
    write_kv_cache(qk[:, heads:], v, *want_caches, slots)
    rotated = qkv.clone()
    kernels.rope_and_cache(rotated, cos_sin, *caches, slots, heads, kv_heads)

    assert torch.equal(rotated[:, : heads * d].view(tokens, heads, d), qk[:, :heads])  # same roundings: exact
    assert torch.equal(rotated[:, (heads + kv_heads) * d :], qkv[:, (heads + kv_heads) * d :])  # v untouched
    assert torch.equal(caches[0], want_caches[0]) and torch.equal(caches[1], want_caches[1])


def linear_case(dtype, rows, in_features, out_features, seed=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    return x, weight, torch.randn(out_features, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 33, 128, 250])  # whole 8- and 16-row tiles and remainders
@pytest.mark.parametrize("out_features", [96, 100, 1000])  # 48-column panels; 16- and 32-wide tails
@pytest.mark.parametrize("in_features", [1536, 1000])  # bfloat16 by AMX tiles where whole 32s, else by vectors
def test_packed_linear_matches_float64(kernels, dtype, rows, out_features, in_features):
    require_kernels(dtype)
    x, weight, bias = linear_case(dtype, rows, in_features, out_features)
    packed = kernels.pack_linear(weight)
    if rows > kernels.max_rows(dtype, in_features):  # 250 rows only by tiles: elsewhere the caller's
        assert kernels.linear(x, packed, out_features, bias) is None
        return
    for b in (bias, None):
        got = kernels.linear(x, packed, out_features, b)
        want = x.double() @ weight.double().T + (0 if b is None else b.double())
        # float32 accumulation of 1536 products, then one rounding to the dtype
        torch.testing.assert_close(got.double(), want, rtol=ulps(dtype), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features", [1536, 1000])
def test_packed_linear_rows_do_not_depend_on_the_batch(kernels, dtype, in_features):
    """Each row comes out the same, bit for bit, alone or in a batch of any size (a verify step's
    rows equal decode steps'; a request's tokens do not depend on who it is batched with)."""
    require_kernels(dtype)
    x, weight, bias = linear_case(dtype, 40, in_features, 100)
    packed = kernels.pack_linear(weight)
    batch = kernels.linear(x, packed, 100, bias)
    for rows in (1, 5, 16, 17, 33):
        assert torch.equal(kernels.linear(x[:rows], packed, 100, bias), batch[:rows]), rows


def test_packed_linear_leaves_other_inputs_to_the_caller(kernels):
    require_kernels(torch.bfloat16)
    assert kernels.max_rows(torch.float32, 64) == kernels.max_rows(torch.bfloat16, 48) == cpu.LINEAR_MAX_ROWS  # no tiles there
    assert kernels.max_rows(torch.bfloat16, 64) in (cpu.LINEAR_MAX_ROWS, cpu.LINEAR_MAX_ROWS_TILES)  # tiles where AMX
    x, weight, _ = linear_case(torch.bfloat16, kernels.max_rows(torch.bfloat16, 64) + 1, 64, 48)
    packed = kernels.pack_linear(weight)
    assert kernels.linear(x, packed, 48) is None  # a prompt chunk: oneDNN's
    assert kernels.linear(x[:4].float(), packed, 48) is None  # another dtype
    assert kernels.pack_linear(torch.randn(48, 63).to(torch.bfloat16)) is None  # an odd number of bf16 inputs
    assert kernels.pack_linear(torch.randn(48, 64).half()) is None
    assert kernels.linear(x[:3, None, :].expand(3, 2, 64), packed, 48).shape == (3, 2, 48)  # any leading shape
    with pytest.raises(ValueError, match="features"):  # a wrong width fails instead of reading past the weight
        kernels.linear(x[:4, :32].contiguous(), packed, 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(32, 49152), (1, 1), (3, 17), (2, 33)])  # whole vectors and tails
def test_argmax_picks_what_torch_picks(kernels, dtype, rows, width):
    g = torch.Generator().manual_seed(rows * width)
    spread = torch.randn(rows, width, generator=g).to(dtype)
    ties = torch.randint(0, 3, (rows, width), generator=g).to(dtype)  # the first of equal maxima
    for x in (spread, ties):
        assert torch.equal(kernels.argmax(x), x.argmax(dim=-1))


def test_argmax_takes_the_first_nan_and_survives_infinities(kernels):
    x = torch.randn(4, 100)
    x[1, 50] = x[1, 7] = float("nan")
    x[2] = float("-inf")
    x[3, 98] = x[3, 99] = float("inf")
    assert kernels.argmax(x).tolist() == x.argmax(dim=-1).tolist() == [int(x[0].argmax()), 7, 0, 98]
