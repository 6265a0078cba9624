"""`profile.validate_loads`: after the fit, the real engine and a simulated twin on the fitted
profile serve the same unseen workload, and the profile reports how far apart they are."""

from __future__ import annotations

import json

import pytest

from framework import LLM
from framework.config import ProfileConfig
from framework.engine.clock import VirtualClock
from framework.engine.sim_engine import SimModelEngine
from framework.sim.profiler import profile_steps
from framework.sim.step_shape import StepShape
from framework.sim.validation import ScaledCost, comparison, format_validation, simulated_twin, step_error, validate
from tests.sim.test_profiler import run_tiny_profile

LENGTHS = {"replay.input.dist": "uniform", "replay.input.min": 4, "replay.input.max": 40, "replay.output.value": 5}
SETTINGS = {"kv_cache.max_tokens": 2048, "scheduler.max_num_tokens": 32, "scheduler.max_batch_size": 8, **LENGTHS}


@pytest.fixture(scope="module")
def profiled(tiny_dir, tmp_path_factory):
    llm = LLM(str(tiny_dir), dtype="float32", **SETTINGS)
    grid = ProfileConfig(
        prefill_tokens=[8, 32], prefill_context=[0], decode_batch=[1, 4], decode_context=[16], mixed_batch=[],
        warmup_steps=0, repeats=1, serving_requests=6, validate_loads=[0.5, 0.9],
    )
    profile = profile_steps(llm, grid)
    path = tmp_path_factory.mktemp("validation") / "tiny.json"
    profile.save(path)
    return llm, grid, profile, path


def test_the_twin_is_the_real_engine_s_setup_on_the_sim_engine(profiled):
    llm, _, _, path = profiled
    twin = simulated_twin(llm, str(path))
    assert isinstance(twin.executor.model_engine, SimModelEngine) and isinstance(twin.clock, VirtualClock)
    assert twin.config.scheduler == llm.config.scheduler and twin.config.kv_cache == llm.config.kv_cache
    assert twin.kv_cache_stats.num_blocks == llm.kv_cache_stats.num_blocks
    assert twin.executor.model_engine.cost_model.describe().startswith("step times fitted to the profile tiny.json")
    assert llm.config.engine.name != "sim"  # the real engine's config is left as it was


def test_each_load_compares_real_and_simulated_on_the_same_requests(profiled):
    llm, grid, profile, path = profiled
    lines = []
    capacity = profile.setup["serving"]["capacity"]
    rows = validate(llm, grid, capacity, str(path), lines.append)
    assert [row["load"] for row in rows] == [0.5, 0.9] and [row["rate"] for row in rows] == [0.5 * capacity, 0.9 * capacity]
    for row in rows:
        assert row["requests"] == 6
        for key in ("ttft_ms.mean", "ttft_ms.p90", "tpot_ms.mean", "e2e_ms.p90"):
            pair = row[key]
            assert pair["real"] > 0 and pair["simulated"] > 0 and pair["rescaled"] > 0
            assert pair["error"] == pytest.approx(pair["simulated"] / pair["real"] - 1)
            assert pair["rescaled_error"] == pytest.approx(pair["rescaled"] / pair["real"] - 1)
        assert row["preemptions"] == {"real": 0, "simulated": 0, "rescaled": 0}
        hits = row["prefix_hit_rate"]  # random prompts share no block
        assert hits == {"real": 0.0, "simulated": 0.0, "rescaled": 0.0}
        steps = row["steps"]  # every step of the real run that computed something: 6 x 5 tokens sampled at least once each
        assert steps["count"] >= 5 and steps["real_s"] > 0 and steps["error"] == pytest.approx(steps["priced_s"] / steps["real_s"] - 1)
        # the rescaled twin's steps take real/priced times as long: its requests finish later exactly when that is above 1
        slower = row["e2e_ms.mean"]["rescaled"] - row["e2e_ms.mean"]["simulated"]
        assert slower > 0 if steps["error"] < 0 else slower <= 0
    assert len(lines) == 2 and lines[0].startswith(f"validation at 50% of capacity ({0.5 * capacity:.2f} req/s): ttft_ms.mean ")
    assert not llm.executor.has_work() and llm.kv_cache_stats.num_free_blocks == llm.kv_cache_stats.num_blocks


def test_a_scaled_cost_model_multiplies_every_step_time(profiled):
    _, _, profile, _ = profiled
    fitted = profile.cost_model
    scaled = ScaledCost(fitted, 1.5)
    shape = StepShape(12, 3, 200, 60, 3)
    assert scaled.step_seconds(shape) == pytest.approx(1.5 * fitted.step_seconds(shape))
    assert scaled.decode_steps_seconds(4, [40, 44]) == pytest.approx([1.5 * s for s in fitted.decode_steps_seconds(4, [40, 44])])
    assert scaled.describe().endswith("times 1.500") and scaled.is_prediction is False
    steps = step_error(fitted, [(shape, 2 * fitted.step_seconds(shape)), (shape, 2 * fitted.step_seconds(shape))])
    assert steps["count"] == 2 and steps["error"] == pytest.approx(-0.5)


def test_validation_needs_the_capacity_of_serving_runs(profiled):
    llm, grid, _, path = profiled
    with pytest.raises(ValueError, match="set profile.serving_requests > 0"):
        validate(llm, grid, 0.0, str(path))
    assert validate(llm, ProfileConfig(validate_loads=[]), 0.0, str(path)) == []


def test_errors_and_the_tables_by_hand():
    real = {"ttft_ms": {"mean": 100.0, "p90": 200.0}, "tpot_ms": {"mean": 20.0, "p90": 25.0}, "e2e_ms": {"mean": 1000.0, "p90": None}, "preemptions": 2, "requests": 10, "prefix_hit_rate": 0.25}
    simulated = {"ttft_ms": {"mean": 110.0, "p90": 150.0}, "tpot_ms": {"mean": 19.0, "p90": 25.0}, "e2e_ms": {"mean": 1200.0, "p90": 900.0}, "preemptions": 3, "prefix_hit_rate": 0.25}
    rescaled = {"ttft_ms": {"mean": 99.0, "p90": 210.0}, "tpot_ms": {"mean": 20.0, "p90": 26.0}, "e2e_ms": {"mean": 1000.0, "p90": 950.0}, "preemptions": 2, "prefix_hit_rate": None}
    steps = {"count": 40, "real_s": 2.0, "priced_s": 1.6, "error": -0.2}
    row = comparison(0.6, 3.0, real, simulated, rescaled, steps)
    assert row["ttft_ms.mean"]["error"] == pytest.approx(0.1) and row["ttft_ms.p90"]["error"] == pytest.approx(-0.25)
    assert row["tpot_ms.mean"]["error"] == pytest.approx(-0.05) and row["tpot_ms.p90"]["error"] == 0
    assert row["ttft_ms.mean"]["rescaled_error"] == pytest.approx(-0.01) and row["tpot_ms.p90"]["rescaled_error"] == pytest.approx(0.04)
    assert row["e2e_ms.p90"] == {"real": None, "simulated": 900.0, "error": None, "rescaled": 950.0, "rescaled_error": None}
    assert row["steps"] is steps and row["preemptions"] == {"real": 2, "simulated": 3, "rescaled": 2}
    as_simulated, at_real_speed = format_validation([row]).split("the same, each real run's steps priced at the speed they ran")
    assert "| 60% (3.00 req/s) | 100.0 / 110.0 (+10%) | 200.0 / 150.0 (-25%) | 20.0 / 19.0 (-5%) | 25.0 / 25.0 (+0%) |" in as_simulated
    assert "| 1000.0 / 1200.0 (+20%) | - / 900.0 | 2 / 3 | 25.0% / 25.0% | -20% of 40 |" in as_simulated
    assert "| 60% (3.00 req/s) | 100.0 / 99.0 (-1%) | 200.0 / 210.0 (+5%) | 20.0 / 20.0 (+0%) | 25.0 / 26.0 (+4%) |" in at_real_speed
    assert at_real_speed.endswith("| 1000.0 / 1000.0 (+0%) | - / 950.0 | 2 / 2 | 25.0% / - |")


def test_python_m_framework_mode_profile_validates(tiny_dir, tmp_path):
    out = tmp_path / "cli.json"
    done = run_tiny_profile(tiny_dir, out, "profile.validate_loads=[0.5]", "replay.input.value=12", "replay.output.value=4", serving_requests=4)
    assert done.returncode == 0, done.stderr
    assert "[profile] validation at 50% of capacity" in done.stdout and "real / simulated (error of the simulation):" in done.stdout
    (row,) = json.loads(out.read_text())["setup"]["validation"]
    assert row["load"] == 0.5 and row["requests"] == 4 and row["ttft_ms.mean"]["real"] > 0
