import gc

import pytest
import torch

from framework import huge_pages
from tests.unit.conftest import new_kv


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


def test_cpu_kv_cache_is_allocated_here_with_its_pages_made_up_front(made):
    kv = new_kv(max_tokens=64, block_size=16, num_layers=2)
    assert made == [((1, 4, 16, 2), torch.float32, True)] * 4  # K and V of each layer
    assert all(t.shape == (1, 4, 16, 2) and not t.any() for pair in kv.kv_caches for t in pair)


def test_packed_linear_weights_are_allocated_here(made):
    from framework.kernels import cpu

    kernels = cpu.load()
    assert kernels is not None, "the C++ kernels did not build on this machine (see the log)"
    packed = kernels.pack_linear(torch.randn(96, 64))
    assert made == [((packed.numel(),), torch.float32, False)]
