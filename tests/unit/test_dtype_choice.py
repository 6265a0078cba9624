"""`model.dtype=auto`: the checkpoint's dtype where the device runs it natively, else float32."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from framework.engine import dtype as dtype_choice
from framework.engine.dtype import choose_dtype

CPU = torch.device("cpu")


def config(dtype):
    return SimpleNamespace(dtype=dtype)


@pytest.fixture(params=[True, False], ids=["bf16-cpu", "plain-cpu"])
def bf16_cpu(request, monkeypatch):
    monkeypatch.setattr(dtype_choice, "cpu_runs_bf16", lambda: request.param)
    return request.param


def test_named_dtypes_are_taken_as_they_are(bf16_cpu):
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        assert choose_dtype(name, CPU, config("bfloat16"))[0] == dtype
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        choose_dtype("fp8", CPU, config(None))


def test_auto_keeps_a_float32_checkpoint_exact(bf16_cpu):
    chosen, why = choose_dtype("auto", CPU, config(torch.float32))
    assert chosen == torch.float32 and "checkpoint's float32" in why


@pytest.mark.parametrize("saved", ["bfloat16", torch.bfloat16, "float16", None])
def test_auto_takes_bfloat16_only_where_the_cpu_runs_it(bf16_cpu, saved):
    chosen, why = choose_dtype("auto", CPU, config(saved))
    assert chosen == (torch.bfloat16 if bf16_cpu else torch.float32)
    assert ("natively" in why) == bf16_cpu


def test_tiny_test_checkpoints_run_in_float32_under_auto(tiny_dir):
    # the comparisons with transformers stay exact without naming a dtype
    from framework.models.checkpoint import load_hf_config

    assert choose_dtype("auto", CPU, load_hf_config(tiny_dir))[0] == torch.float32
