"""The `cpu_kernels` backend: its registration, when `engine.backend=auto` takes it, its ops against
the `torch` backend's, and the decoders' argmax through it."""

from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from cpu_kernels_checks import require_kernels
from omegaconf import OmegaConf

import framework_cpu_kernels
from framework import LLM, SamplingParams
from framework.backend.choice import choose_backend
from framework.backend.torch_backend import TorchBackend
from framework.decoder.greedy import GreedyDecoder
from framework_cpu_kernels.backend import CPUKernelsBackend
from framework_cpu_kernels.config import CPUKernelsConfig
from tests.conftest import GREEDY, random_prompts

CPU = torch.device("cpu")


def choose(plugins, name, dtype=torch.float32, head_dim=64, device=CPU):
    return choose_backend(OmegaConf.create({"backend": name}), plugins["backend"], device, dtype, head_dim)


def test_registers_the_backend_lazily_and_without_torch():
    from framework.plugins.manager import create_plugin_manager

    plugins = create_plugin_manager(extra_plugins=[framework_cpu_kernels], autoload=False)
    entry = plugins["backend"].get("cpu_kernels")
    assert entry.factory == "framework_cpu_kernels.backend:CPUKernelsBackend" and entry.config is CPUKernelsConfig
    code = "import sys, framework_cpu_kernels; assert 'torch' not in sys.modules, 'registration imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=framework_cpu_kernels.__path__[0] + "/..")


def test_auto_takes_it_where_the_kernels_run_and_says_so(kernels, plugins, caplog):
    with caplog.at_level(logging.INFO, logger="framework.backend.choice"):
        backend = choose(plugins, "auto")
    assert isinstance(backend, CPUKernelsBackend) and backend.name == "cpu_kernels"
    assert "engine.backend=auto chose 'cpu_kernels'" in caplog.text


def test_auto_passes_it_over_where_it_does_not_apply(plugins):
    assert not CPUKernelsBackend.supports(CPU, torch.float16, 64)
    assert not CPUKernelsBackend.supports(CPU, torch.float32, 48)  # no attention kernel for this head size
    assert not CPUKernelsBackend.supports(torch.device("cuda"), torch.float32, 64)
    assert isinstance(choose(plugins, "auto", dtype=torch.float16), TorchBackend)
    with pytest.raises(ValueError, match=r"does not run this device, dtype or head size \(cpu / float16"):
        choose(plugins, "cpu_kernels", dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_layer_ops_match_the_torch_backend(kernels, dtype):
    require_kernels(dtype)
    ours, theirs = CPUKernelsBackend(None, None, CPU, dtype), TorchBackend(None, None, CPU, dtype)
    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(5, 192, generator=g).to(dtype) for _ in range(2))
    weight = (torch.rand(192, generator=g) + 0.5).to(dtype)
    for rows in (0, 3, 200):  # no row (an LM head where no prompt is done), a decode step (the kernels' linear), a prompt chunk (oneDNN's)
        w = torch.randn(96, 192, generator=g).to(dtype)
        x_rows = torch.randn(rows, 192, generator=g).to(dtype)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ours.linear(x_rows, w, None, ours.prepare_linear(w)), theirs.linear(x_rows, w, None, None), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(ours.rms_norm(x, weight, 1e-6), theirs.rms_norm(x, weight, 1e-6), rtol=2e-2, atol=1e-5)
    got, got_sum = ours.add_rms_norm(x, residual.clone(), weight, 1e-6)
    want, want_sum = theirs.add_rms_norm(x, residual.clone(), weight, 1e-6)
    assert torch.equal(got_sum, want_sum)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(ours.silu_and_mul(x), theirs.silu_and_mul(x), rtol=2e-2, atol=1e-5)


def test_greedy_decoders_take_the_backends_argmax(kernels, monkeypatch):
    backend = CPUKernelsBackend(None, None, CPU, torch.float32)
    shapes, real = [], type(kernels).argmax
    monkeypatch.setattr(type(kernels), "argmax", lambda self, x: shapes.append(tuple(x.shape)) or real(self, x))
    logits = torch.randint(0, 3, (16, 300), generator=torch.Generator().manual_seed(3)).float()  # ties
    requests = [SimpleNamespace()] * 16
    assert GreedyDecoder(SimpleNamespace(name="greedy"), backend=backend).decode(requests, logits).token_ids == logits.argmax(-1).tolist()
    assert shapes == [(16, 300)]
    assert GreedyDecoder(SimpleNamespace(name="greedy")).decode(requests, logits).token_ids == logits.argmax(-1).tolist()
    assert shapes == [(16, 300)]  # no backend: PyTorch's


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_on_it_generates_what_it_does_on_torch(kernels, plugins, tiny_dir, dtype):
    require_kernels(getattr(torch, dtype))
    prompts = random_prompts([3, 9, 40], seed=2)
    outputs = {}
    for name in ("torch", "cpu_kernels"):
        llm = LLM(str(tiny_dir), plugins=plugins, dtype=dtype, backend=name, **{"kv_cache.max_tokens": 2048})
        assert llm.executor.model_engine.backend.name == name
        results = llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
        outputs[name] = [o.outputs[0].token_ids for o in results]
    if dtype == "float32":
        assert outputs["cpu_kernels"] == outputs["torch"]
    else:  # bfloat16 rounds after sums taken in another order: the first steps agree at least
        assert [o[:2] for o in outputs["cpu_kernels"]] == [o[:2] for o in outputs["torch"]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_step_that_samples_no_row_runs(kernels, plugins, tiny_dir, dtype):
    """A long prompt's first chunks alone in a step sample nothing: the LM head gets no rows."""
    require_kernels(getattr(torch, dtype))
    llm = LLM(str(tiny_dir), plugins=plugins, dtype=dtype, backend="cpu_kernels", **{"kv_cache.max_tokens": 2048, "scheduler.max_num_tokens": 16})
    (out,) = llm.generate(random_prompts([70], seed=4), SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3 and llm.executor.num_steps >= 5  # 70 prompt tokens in chunks of 16
