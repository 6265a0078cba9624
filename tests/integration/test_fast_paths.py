"""Correctness of the CPU fast paths: oneDNN-packed linears, fused projections, paged attention (on
`torch` and on the backend `engine.backend=auto` picks), bfloat16 inference, and the engine with
packing on and off. No timings: only that the fast paths compute what the plain ones do."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from omegaconf import OmegaConf

from framework import LLM, SamplingParams
from framework.backend.choice import choose_backend
from framework.backend.torch_backend import TorchBackend
from framework.engine.pytorch_model_engine import PyTorchModelEngine, keep_onednn_primitives
from framework.layers.attention import write_kv_cache
from framework.layers.linear import Linear
from framework.plugins.manager import create_plugin_manager
from tests.conftest import GREEDY, random_prompts

# ---- Linear.pack() --------------------------------------------------------------------------


def make_linear(dtype, bias=True, in_features=256, out_features=96, seed=0):
    torch.manual_seed(seed)
    return Linear(in_features, out_features, bias, TorchBackend(None, None, torch.device("cpu"), dtype)).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_linear_matches_f_linear(dtype, bias):
    layer = make_linear(dtype, bias)
    assert layer.pack() is True and layer.prepared is not None
    for rows in (1, 7, 64):
        x = torch.randn(rows, layer.in_features, dtype=dtype)
        ours, plain = layer(x), F.linear(x, layer.weight, layer.bias)
        if dtype == torch.bfloat16:
            assert torch.equal(ours, plain), f"{rows} rows"
        else:  # fp32: same sums, possibly another summation order
            torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5 * plain.abs().max().item())


def test_pack_refuses_float16_and_falls_back_to_f_linear():
    layer = make_linear(torch.float16)
    assert layer.pack() is False and layer.prepared is None
    x = torch.randn(7, layer.in_features, dtype=torch.float16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_pack_refuses_without_onednn_and_drops_the_stale_copy(monkeypatch):
    layer = make_linear(torch.float32)
    assert layer.pack() is True
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    assert layer.pack() is False and layer.prepared is None
    x = torch.randn(7, layer.in_features)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # the new weight, unpacked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_repacking_follows_a_changed_weight(dtype):
    layer = make_linear(dtype)
    assert layer.pack()
    x = torch.randn(7, layer.in_features, dtype=dtype)
    before = layer(x)
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
        layer.bias.add_(1.0)
    assert layer.pack()
    after, plain = layer(x), F.linear(x, layer.weight, layer.bias)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, plain, rtol=0, atol=1e-5 * plain.abs().max().item())


# ---- engines on the tiny checkpoint ---------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_dir):
    """`engine(dtype, pack, backend)`: one LLM per combination, built on first use and shared by the
    module; on the CPU even where a GPU is present (packed weights are a CPU path)."""
    built = {}

    def get(dtype: str, pack: bool = True, backend: str = "auto") -> LLM:
        if (dtype, pack, backend) not in built:
            options = {"kv_cache.max_tokens": 4096, "engine.pack_weights": pack, "model.device": "cpu"}
            built[dtype, pack, backend] = LLM(str(tiny_dir), dtype=dtype, backend=backend, **options)
        return built[dtype, pack, backend]

    return get


def model_of(llm):
    return llm.executor.model_engine.model


def linears(model):
    return [m for m in model.modules() if isinstance(m, Linear)]


# ---- fused projections ----------------------------------------------------------------------


@torch.no_grad()
def test_fused_projections_equal_transformers_unfused(tiny_dir, engine):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    ours = model_of(engine("float32"))
    torch.manual_seed(1)
    x = torch.randn(9, hf.config.hidden_size)
    for i, (layer, ref) in enumerate(zip(ours.layers, hf.model.layers, strict=True)):
        qkv_proj = layer.self_attn.qkv_proj
        q, k, v = qkv_proj(x).split([size for _, size in qkv_proj.part_rows.values()], dim=-1)
        gate, up = layer.mlp.gate_up_proj(x).chunk(2, dim=-1)
        attn, mlp = ref.self_attn, ref.mlp
        for name, got, want in [
            ("q", q, attn.q_proj(x)), ("k", k, attn.k_proj(x)), ("v", v, attn.v_proj(x)),
            ("gate", gate, mlp.gate_proj(x)), ("up", up, mlp.up_proj(x)),
        ]:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"layer {i} {name}: {m}")


# ---- paged attention ------------------------------------------------------------------------

BLOCK_SIZE, NUM_BLOCKS, HEADS, KV_HEADS, HEAD_DIM = 4, 40, 4, 2, 16


@dataclass
class FakeRequest:
    """The fields `prepare_inputs` reads from a scheduled request."""

    start: int  # tokens already in the cache
    n: int  # tokens computed this step
    block_table: list[int]
    sampling_params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=1))

    @property
    def num_computed_tokens(self):
        return self.start

    @property
    def num_scheduled_tokens(self):
        return self.n

    @property
    def num_tokens(self):
        return self.start + self.n

    @property
    def prompt_len(self):
        return self.num_tokens

    def tokens(self, begin, end):
        return list(range(begin, end))


class FakeKVCacheManager:
    block_size = BLOCK_SIZE

    def __init__(self, k_cache, v_cache):
        self.caches = [(k_cache, v_cache)]

    def get_block_table(self, request):
        return request.block_table

    def get_kv_caches(self):
        return self.caches


def fake_requests(shapes, seed, shared=0):
    """Requests with the given (start, n) on random, non-contiguous blocks: the first `shared` blocks
    common to all (a cached prefix they share, so no request writes there), the rest their own."""
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    prefix, order = order[:shared], order[shared:]
    requests = []
    for start, n in shapes:
        assert start >= shared * BLOCK_SIZE
        count = -(-(start + n) // BLOCK_SIZE) - shared
        requests.append(FakeRequest(start, n, prefix + order[:count]))
        order = order[count:]
    return requests


def reference_attention(q, k, v, k_cache, v_cache, requests, scale):
    """Per request, causal softmax attention in float64 over its cached keys/values (positions before
    `start`, read from the caches as they were before the step) followed by the step's new ones."""
    out, token = [], 0
    group = HEADS // KV_HEADS
    for r in requests:
        positions = torch.arange(r.start)
        blocks = torch.tensor(r.block_table, dtype=torch.long)[positions // BLOCK_SIZE]
        new = slice(token, token + r.n)
        keys = torch.cat([k_cache[:, blocks, positions % BLOCK_SIZE].transpose(0, 1), k[new]]).double()
        values = torch.cat([v_cache[:, blocks, positions % BLOCK_SIZE].transpose(0, 1), v[new]]).double()
        for i in range(r.n):
            visible = r.start + i + 1
            heads = []
            for h in range(HEADS):
                kv = h // group
                scores = keys[:visible, kv] @ q[token + i, h].double() * scale
                heads.append(torch.softmax(scores, dim=0) @ values[:visible, kv])
            out.append(torch.stack(heads))
        token += r.n
    return torch.stack(out)


BATCHES = {
    # name: (shared prefix blocks, [(tokens already cached, tokens this step)]). Decode rows have
    # n == 1; prefill chunks may start mid-context and cross block boundaries; mixed batches
    # interleave the two kinds.
    "mixed": (0, [(0, 6), (9, 1), (5, 7), (14, 1), (3, 2), (0, 1)]),
    "decode_only": (0, [(9, 1), (0, 1), (22, 1), (4, 1)]),
    "prefill_only": (0, [(0, 11), (6, 3), (13, 5)]),
    "shared_prefix_decode": (2, [(9, 1), (8, 1), (15, 1)]),
    "shared_prefix_mixed": (3, [(12, 5), (17, 1), (14, 2), (13, 1)]),
}


def make_backend(name: str, dtype=torch.float32, head_dim: int = HEAD_DIM):
    """The CPU backend `engine.backend=<name>` builds for this dtype and head size."""
    registry = create_plugin_manager()["backend"]
    return choose_backend(OmegaConf.create({"backend": name}), registry, torch.device("cpu"), dtype, head_dim)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("batch", list(BATCHES))
@torch.no_grad()
def test_paged_attention_matches_naive_reference(batch, backend):
    torch.manual_seed(2)
    shared, shapes = BATCHES[batch]
    requests = fake_requests(shapes, seed=3, shared=shared)
    fake_engine = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, backend=make_backend(backend))
    k_cache = torch.randn(KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM)
    v_cache = torch.randn(KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM)
    _, positions, meta, *_ = PyTorchModelEngine.prepare_inputs(fake_engine, requests, FakeKVCacheManager(k_cache, v_cache))
    tokens = len(positions)
    q = torch.randn(tokens, HEADS, HEAD_DIM)
    k, v = torch.randn(tokens, KV_HEADS, HEAD_DIM), torch.randn(tokens, KV_HEADS, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    before_k, before_v = k_cache.clone(), v_cache.clone()

    write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    out = fake_engine.backend.attention(q, k_cache, v_cache, meta, scale)

    want = reference_attention(q, k, v, before_k, before_v, requests, scale)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # The new k/v went into each request's own block at each token's position, and nowhere else.
    expected_k, expected_v = before_k.clone(), before_v.clone()
    token = 0
    for r in requests:
        for p in range(r.start, r.start + r.n):
            block, offset = r.block_table[p // BLOCK_SIZE], p % BLOCK_SIZE
            expected_k[:, block, offset], expected_v[:, block, offset] = k[token], v[token]
            token += 1
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


# ---- bfloat16 against float32 ---------------------------------------------------------------

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%). Through two layers and a 49k-way
# log-softmax, the tiny model's logprobs move by ~0.01 on average and ~0.05 at worst (measured);
# 0.15 leaves a 3x margin yet is far below what a wrong kernel, mask or cast would produce.
BF16_LOGPROB_ATOL = 0.15


def prompt_logprobs(llm, prompts, top):
    """Per prompt, the engine's logprobs of prompt tokens 1.. (`top` candidates plus the actual one)."""
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=top, **GREEDY), use_tqdm=False)
    return [out.prompt_logprobs[1:] for out in outs]


def best(row):
    return min(row, key=lambda token: row[token].rank)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bf16_engine_really_runs_in_bf16(engine, backend):
    for dtype, torch_dtype in [("bfloat16", torch.bfloat16), ("float32", torch.float32)]:
        llm = engine(dtype, backend=backend)
        model = model_of(llm)
        assert {p.dtype for p in model.parameters()} == {torch_dtype}
        if backend == "torch":
            assert {m.prepared.dtype for m in linears(model)} == {torch_dtype}  # oneDNN's copy
        caches = llm.executor.kv_cache_manager.get_kv_caches()
        assert len(caches) == len(model.layers)
        assert {t.dtype for layer in caches for t in layer} == {torch_dtype}


def test_bf16_prompt_logprobs_close_to_fp32(engine):
    prompts = random_prompts([5, 17, 40, 64], seed=11)
    fp32 = prompt_logprobs(engine("float32"), prompts, top=5)
    bf16 = prompt_logprobs(engine("bfloat16"), prompts, top=5)
    agree = total = 0
    for prompt, rows32, rows16 in zip(prompts, fp32, bf16, strict=True):
        for i, (r32, r16) in enumerate(zip(rows32, rows16, strict=True)):
            actual = prompt[i + 1]
            assert abs(r32[actual].logprob - r16[actual].logprob) < BF16_LOGPROB_ATOL, f"position {i + 1}"
            top32, top16 = best(r32), best(r16)
            assert abs(r32[top32].logprob - r16[top16].logprob) < BF16_LOGPROB_ATOL
            agree += top32 == top16
            total += 1
            if top32 != top16:  # only at a near-tie: bf16's favourite is nearly fp32's too
                assert top16 in r32 and r32[top32].logprob - r32[top16].logprob < 2 * BF16_LOGPROB_ATOL
    assert agree >= 0.9 * total, f"top-1 agrees at only {agree}/{total} positions"


def test_bf16_greedy_tracks_fp32(engine):
    # The random tiny model has many near-ties (e.g. two tokens 0.003 apart), so a bf16 greedy run
    # can legitimately leave fp32's path at any step, even the first. Instead of identical text we
    # check, on bf16's own path, that fp32 agrees with (almost) every choice bf16 made and rates the
    # rest as near-ties.
    prompts = random_prompts([3, 9, 17, 30, 41, 64, 100, 12], seed=21)
    generated = engine("bfloat16").generate(prompts, SamplingParams(max_tokens=16, **GREEDY), use_tqdm=False)
    paths = [prompt + out.outputs[0].token_ids for prompt, out in zip(prompts, generated)]
    fp32 = prompt_logprobs(engine("float32"), paths, top=1)
    agree = total = 0
    for prompt, path, rows in zip(prompts, paths, fp32, strict=True):
        for position in range(len(prompt), len(path)):
            row = rows[position - 1]  # rows start at token 1
            chosen = row[path[position]]
            assert row[best(row)].logprob - chosen.logprob < BF16_LOGPROB_ATOL, f"not a near-tie at {position}"
            agree += chosen.rank == 1
            total += 1
    assert agree >= 0.8 * total, f"fp32 agrees with only {agree}/{total} bf16 choices"


# ---- the engine with and without packed weights ---------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_packing_does_not_change_greedy_output(engine, dtype, backend):
    packed, plain = engine(dtype, pack=True, backend=backend), engine(dtype, pack=False, backend=backend)
    assert all(m.prepared is not None for m in linears(model_of(packed)))
    assert all(m.prepared is None for m in linears(model_of(plain)))
    prompts = random_prompts([4, 19, 33, 70], seed=31)
    params = SamplingParams(max_tokens=16, **GREEDY)
    with_packing = [out.outputs[0].token_ids for out in packed.generate(prompts, params, use_tqdm=False)]
    without = [out.outputs[0].token_ids for out in plain.generate(prompts, params, use_tqdm=False)]
    assert with_packing == without
    assert all(len(tokens) == 16 for tokens in with_packing)


def test_onednn_keeps_more_primitives_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    keep_onednn_primitives()
    assert int(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]) > 1024  # oneDNN's default
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    keep_onednn_primitives()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
