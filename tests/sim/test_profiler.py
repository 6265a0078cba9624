"""`mode=profile` on a tiny model and a tiny grid: every kind of shape is timed through the real
executor, the profile file round-trips, and the sim engine runs on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from framework import LLM, SamplingParams
from framework.config import ProfileConfig
from framework.sim.profiler import profile_steps
from framework.sim.step_profile import StepProfile
from framework.sim.step_shape import StepShape

GRID = ProfileConfig(
    prefill_tokens=[8, 40], prefill_context=[0, 40], decode_batch=[1, 3, 99], decode_context=[20],
    mixed_batch=[2], mixed_tokens=[12], warmup_steps=1, repeats=2, serving_requests=0,
)


@pytest.fixture(scope="module")
def profiled(tiny_dir, tmp_path_factory):
    llm = LLM(str(tiny_dir), dtype="float32", **{"kv_cache.max_tokens": 2048, "scheduler.max_batch_size": 8})
    lines = []
    profile = profile_steps(llm, GRID, lines.append)
    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    profile.save(path)
    return profile, path, lines, llm


def test_every_grid_shape_is_timed_or_said_to_be_skipped(profiled):
    profile, _, lines, _ = profiled
    shapes = [shape for shape, _ in profile.samples]
    assert StepShape(8, 1, 36, 8, 1) in shapes and StepShape(40, 1, 820, 40, 1) in shapes  # chunks from position 0
    # a cached context is whole blocks of 16: 40 -> 32
    assert StepShape(8, 1, 8 * 32 + 36, 40, 1) in shapes and StepShape(40, 1, 40 * 32 + 820, 72, 1) in shapes
    # a decoding request reads 20 + 1 tokens in the warm-up step, then 22 and 23 in the timed ones
    decode = {s.requests: s.context for s in shapes if s.tokens == s.sampled == s.requests and s.tokens in (1, 3)}
    assert decode[1] in (22, 23) and decode[3] in (3 * 22, 3 * 23)
    mixed = [s for s in shapes if s.tokens == 2 + 12]
    assert mixed and mixed[0].requests == 3 and mixed[0].sampled == 3
    assert all(seconds > 0 for _, seconds in profile.samples)
    assert any("decode batch 99" in line and "skipped (scheduler.max_batch_size=8)" in line for line in lines)
    assert len(profile.samples) == len(lines) - 1 == 2 * 2 + 2 + 1


def test_the_profile_file_round_trips(profiled):
    profile, path, _, _ = profiled
    data = json.loads(path.read_text())
    assert data["device"] == "cpu" and data["dtype"] == "float32" and data["model"]["vocab_size"] == 49152
    assert data["setup"]["scheduler"]["max_batch_size"] == 8 and data["relative_errors"]["held_out"]["mean"] >= 0
    loaded = StepProfile.load(path)
    assert loaded.samples == profile.samples and loaded.model_shape == profile.model_shape
    for shape, _ in profile.samples:
        assert loaded.cost_model.step_seconds(shape) == pytest.approx(profile.cost_model.step_seconds(shape))


def test_the_executor_is_left_as_it_was(profiled):
    _, _, _, llm = profiled
    assert type(llm.executor.model_engine).__name__ == "PyTorchModelEngine" and not llm.executor.has_work()
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_the_sim_engine_runs_on_the_profile(profiled, tiny_dir):
    profile, path, _, _ = profiled
    sim = LLM(str(tiny_dir), engine="sim", **{"engine.profile": str(path), "kv_cache.max_tokens": 2048})
    engine = sim.executor.model_engine
    assert engine.cost_model.describe().startswith("step times fitted to the profile tiny.json")
    assert str(engine.dtype) == "torch.float32" and not engine.cost_model.is_prediction
    out = sim.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == [engine.token_id] * 4
    assert engine.clock.now() > 0
    sized = {"kv_cache.memory_fraction": 0.001}  # of the profiled machine's memory, as the real engine's pool
    real_blocks = LLM(str(tiny_dir), dtype="float32", **sized).kv_cache_stats.num_blocks
    assert LLM(str(tiny_dir), engine="sim", **{"engine.profile": str(path), **sized}).kv_cache_stats.num_blocks == real_blocks
    with pytest.raises(ValueError, match="measured in float32"):
        LLM(str(tiny_dir), engine="sim", dtype="bfloat16", **{"engine.profile": str(path)})


def run_tiny_profile(tiny_dir, out, *extra: str, serving_requests: int = 0) -> subprocess.CompletedProcess:
    """`python -m framework mode=profile` on the tiny model, a grid of two shapes, and `extra` overrides."""
    args = [
        "mode=profile", f"model.path={tiny_dir}", "model.dtype=float32", f"profile.out={out}", "kv_cache.max_tokens=1024",
        "profile.prefill_tokens=[8]", "profile.prefill_context=[0]", "profile.decode_batch=[2]", "profile.decode_context=[16]",
        "profile.mixed_batch=[]", "profile.warmup_steps=0", "profile.repeats=1", f"profile.serving_requests={serving_requests}", *extra,
    ]
    return subprocess.run([sys.executable, "-m", "framework", *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_python_m_framework_mode_profile(tiny_dir, tmp_path):
    out = tmp_path / "cli.json"
    done = run_tiny_profile(tiny_dir, out)
    assert done.returncode == 0, done.stderr
    assert "[profile] decode batch 2 at 16 tokens:" in done.stdout and f"wrote {out}" in done.stdout
    assert [shape.tokens for shape, _ in StepProfile.load(out).samples] == [8, 2]
    refused = run_tiny_profile(tiny_dir, out, "engine=sim")
    assert refused.returncode == 2 and "engine=sim computes nothing to time" in refused.stderr


def test_a_decode_point_times_its_whole_batch_when_prompts_take_several_steps(tiny_dir):
    """Under a small token budget the first prompts decode while the others are computed; their
    requests must not run out of tokens before the timed steps (which would time a smaller batch)."""
    llm = LLM(str(tiny_dir), dtype="float32", **{"kv_cache.max_tokens": 2048, "scheduler.max_num_tokens": 24})
    grid = ProfileConfig(prefill_tokens=[], prefill_context=[], decode_batch=[4], decode_context=[20], mixed_batch=[], warmup_steps=1, repeats=2, serving_requests=0)
    profile = profile_steps(llm, grid)
    (shape, _), = profile.samples
    assert shape.requests == shape.tokens == 4  # 4 x 20 prompt tokens took 4 steps of 24


def test_serving_runs_time_every_step_of_a_burst_and_of_poisson_arrivals(tiny_dir):
    """After the grid the engine serves `replay`'s requests three times (at once, then at 50% and
    90% of the capacity that measured): every step is a sample, so together they compute each
    request's tokens three times over, and sample each output token once a run."""
    lengths = {"replay.input.dist": "uniform", "replay.input.min": 4, "replay.input.max": 40, "replay.output.value": 5}
    llm = LLM(str(tiny_dir), dtype="float32", **{"kv_cache.max_tokens": 2048, "scheduler.max_num_tokens": 32, **lengths})
    grid = ProfileConfig(prefill_tokens=[8], prefill_context=[0], decode_batch=[], mixed_batch=[], warmup_steps=0, repeats=1, serving_requests=6)
    lines = []
    profile = profile_steps(llm, grid, lines.append)
    served = profile.samples[1:]
    assert [line.split(":")[0] for line in lines] == ["prefill 8 tokens after 0", "serving", "serving", "serving"]
    assert "6 requests at once" in lines[1] and "at 50% of that" in lines[2] and "at 90% of that" in lines[3]
    capacity = profile.setup["serving"]["capacity"]
    assert capacity > 0 and f"({0.9 * capacity:.2f} req/s)" in lines[3]
    prompts = [int(n) for n in _replay_prompt_lengths(llm, 6)]
    assert sum(s.tokens for s, _ in served) == 3 * sum(p + 5 - 1 for p in prompts)
    assert sum(s.sampled for s, _ in served) == 3 * 6 * 5
    assert max(s.requests for s, _ in served) > 1 and all(seconds > 0 for _, seconds in served)
    assert not llm.executor.has_work() and llm.kv_cache_stats.num_free_blocks == llm.kv_cache_stats.num_blocks


def _replay_prompt_lengths(llm, n):
    from omegaconf import OmegaConf

    from framework.replay.runner import prompt_token_ids
    from framework.replay.workload import build_workload

    config = OmegaConf.merge(llm.config.replay, {"num_requests": n, "seed": 0})
    return [len(r.prompt_token_ids) for r in build_workload(config, prompt_token_ids(llm, None)).requests]
