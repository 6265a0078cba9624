"""Zero-filled CPU tensors in 2 MB-page-advised memory (framework_cpu_kernels/huge_pages.py), and
what the `cpu_kernels` backend allocates there: the KV cache and the packed linear weights."""

import gc

import pytest
import torch

from framework_cpu_kernels import huge_pages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_zeros_are_zero_filled_contiguous_cpu_tensors(dtype):
    t = huge_pages.zeros((3, 5, 7), dtype)
    assert t.shape == (3, 5, 7) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert not t.any()
    assert huge_pages.zeros((0, 4), dtype).shape == (0, 4)


def test_small_tensors_share_a_mapping_without_overlapping():
    tensors = [huge_pages.zeros((100,), torch.float32) for _ in range(50)]
    for i, t in enumerate(tensors):
        t.fill_(i)
    for i, t in enumerate(tensors):
        assert (t == i).all()
        assert t.data_ptr() % huge_pages.ALIGNMENT == 0
    starts = sorted(t.data_ptr() for t in tensors)
    assert all(b - a >= 400 for a, b in zip(starts, starts[1:]))


def test_large_tensors_start_on_a_huge_page_and_outlive_the_arena_moving_on():
    big = huge_pages.zeros((huge_pages.SHARED_MAPPING // 2,), torch.uint8)
    assert big.data_ptr() % huge_pages.HUGE_PAGE == 0
    small = huge_pages.zeros((1000,), torch.float32).fill_(3)
    for _ in range(3):  # enough to fill several shared mappings: the first one stays while `small` lives
        junk = [huge_pages.zeros((huge_pages.SHARED_MAPPING // 8,), torch.uint8) for _ in range(8)]
        del junk
        gc.collect()
    assert (small == 3).all()


def test_touch_makes_the_pages_now():
    t = huge_pages.zeros((4 << 20,), torch.uint8, touch=True)
    assert not t.any()


@pytest.fixture
def made(monkeypatch):
    """What huge_pages.zeros is asked for, while still making it."""
    calls, make = [], huge_pages.zeros

    def spy(shape, dtype, touch=False):
        calls.append((tuple(shape), dtype, touch))
        return make(shape, dtype, touch)

    monkeypatch.setattr(huge_pages, "zeros", spy)
    return calls


@pytest.fixture
def backend(kernels):
    from framework_cpu_kernels.backend import CPUKernelsBackend

    return CPUKernelsBackend(None, None, torch.device("cpu"), torch.float32)


def test_the_kv_cache_is_allocated_here_with_its_pages_made_up_front(backend, made):
    t = backend.kv_cache_tensor((1, 4, 16, 2))
    assert made == [((1, 4, 16, 2), torch.float32, True)]
    assert t.shape == (1, 4, 16, 2) and not t.any()


def test_packed_linear_weights_are_allocated_here(backend, made):
    packed = backend.prepare_linear(torch.randn(96, 64)).kernel
    assert made == [((packed.numel(),), torch.float32, False)]


def test_the_engines_kv_cache_is_the_backends(plugins, tiny_dir, backend, made):
    from framework import LLM

    llm = LLM(str(tiny_dir), plugins=plugins, backend="cpu_kernels", **{"kv_cache.max_tokens": 64, "engine.pack_weights": False})
    caches = llm.executor.kv_cache_manager.get_kv_caches()
    assert [call for call in made if call[2]] == [(tuple(caches[0][0].shape), torch.float32, True)] * 2 * len(caches)
