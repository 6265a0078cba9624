"""Which heads a tensor-parallel rank keeps, without starting any process: its even share of the
query and KV heads, one replicated KV head where the ranks outnumber the KV heads (the one its
query heads read), the fused QKV weight's rows taken accordingly, and a clear error for what
does not divide."""

from __future__ import annotations

import pytest
import torch

from framework.backend.torch_backend import TorchBackend
from framework.layers.self_attention import SelfAttention
from framework.layers.tensor_parallel import TensorParallel, building


@pytest.mark.parametrize("num_kv_heads, size, expected", [
    (4, 2, [(0, 2), (2, 2)]),  # an even share
    (2, 2, [(0, 1), (1, 1)]),
    (1, 2, [(0, 1), (0, 1)]),  # MQA: every rank keeps the one KV head
    (2, 4, [(0, 1), (0, 1), (1, 1), (1, 1)]),  # each KV head on two ranks
])
def test_kv_heads_split_or_replicate(num_kv_heads, size, expected):
    assert [TensorParallel(rank, size).kv_heads(num_kv_heads) for rank in range(size)] == expected


@pytest.mark.parametrize("num_heads, num_kv_heads, size, message", [
    (9, 3, 2, r"attention heads \(9\) is not divisible by engine.tensor_parallel_size=2"),
    (6, 3, 2, r"KV heads \(3\) is not divisible by engine.tensor_parallel_size=2"),
    (12, 2, 3, r"engine.tensor_parallel_size=3 is more than the KV heads \(2\) but not a multiple of them"),
    (4, 1, 8, r"attention heads \(4\) is not divisible by engine.tensor_parallel_size=8"),
])
def test_what_does_not_divide_is_named(num_heads, num_kv_heads, size, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"), building(TensorParallel(0, size)):
        SelfAttention(32, num_heads, num_kv_heads, 4, backend=None)


def test_each_rank_loads_the_kv_head_its_query_heads_read():
    num_heads, num_kv_heads, head_dim, size = 8, 2, 4, 4
    q, k, v = (torch.randn(n * head_dim, 32) for n in (num_heads, num_kv_heads, num_kv_heads))
    backend = TorchBackend(None, None, torch.device("cpu"), torch.float32)
    for rank in range(size):
        with building(TensorParallel(rank, size)):
            attn = SelfAttention(32, num_heads, num_kv_heads, head_dim, backend)
        for part, tensor in zip("qkv", (q, k, v)):
            attn.qkv_proj.load_weight("weight", tensor, part)
        heads = range(rank * 2, rank * 2 + 2)  # this rank's query heads, whose GQA group is head // 4
        (kv_head,) = {head // (num_heads // num_kv_heads) for head in heads}
        want = torch.cat([q[heads[0] * head_dim : (heads[-1] + 1) * head_dim], *(t[kv_head * head_dim : (kv_head + 1) * head_dim] for t in (k, v))])
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
        assert torch.equal(attn.qkv_proj.weight, want)
