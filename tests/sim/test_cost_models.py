"""The cost models: the non-negative least squares, the fitted model against known functions, the
roofline against figures worked out by hand, and the shapes they price."""

from __future__ import annotations

import numpy as np
import pytest

from framework.request import LlmRequest
from framework.sampling_params import SamplingParams
from framework.sim.fitted_cost import FittedCostModel, choose_knots, held_out_errors, nnls, token_basis
from framework.sim.hardware import Hardware, hardware_files
from framework.sim.model_shape import ModelShape
from framework.sim.roofline import RooflineCostModel
from framework.sim.step_shape import StepShape


def test_nnls_finds_a_nonnegative_solution_exactly():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6))
    truth = np.array([1.0, 0.0, 2.0, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(nnls(a, a @ truth), truth, atol=1e-10)


def test_nnls_meets_the_optimality_conditions_where_the_unconstrained_answer_is_negative():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=30)
    x = nnls(a, b)
    gradient = a.T @ (b - a @ x)  # what lowering the residual asks of each variable
    assert (x >= 0).all() and (x == 0).any()
    np.testing.assert_allclose(gradient[x > 0], 0, atol=1e-9)
    assert (gradient[x == 0] <= 1e-9).all()


def test_token_basis_interpolates_between_knots_and_extends_the_end_segments():
    knots = (1, 16, 128)
    f = np.array([2.0, 5.0, 12.0])
    assert f @ token_basis(16, knots) == pytest.approx(5.0)
    assert f @ token_basis(72, knots) == pytest.approx(8.5)  # half way from 16 to 128
    assert f @ token_basis(240, knots) == pytest.approx(19.0)  # the last slope, 1/16 a token, goes on
    assert np.array([2.0]) @ token_basis(300, (7,)) == pytest.approx(2.0)  # one knot: a constant


def test_knots_sit_at_token_counts_measured_more_than_once():
    tokens = [1, 1, 4, 4, 9, 16, 16, 68, 300]  # 9 and 68: one shape each (a mixed step, say)
    assert choose_knots(tokens, 8) == [1, 4, 16, 300]  # the largest always
    many = [t for t in range(1, 3000, 7) for _ in range(2)]
    knots = choose_knots(many, 8)
    assert knots[0] == 1 and knots[-1] == many[-1] and len(knots) <= 8 and set(knots) <= set(many)


def test_held_out_errors_predict_each_fold_from_the_others():
    truth = FittedCostModel((1, 64, 256), (0.004, 0.006, 0.02), (2e-9, 3e-7, 5e-5))
    samples = [(s, truth.step_seconds(s)) for s in _shapes(np.random.default_rng(4), 60) if s.tokens <= 256]
    assert held_out_errors(samples)["max"] < 1e-6
    noisy = [(s, t * (1.3 if i == 0 else 1.0)) for i, (s, t) in enumerate(samples)]
    assert held_out_errors(noisy)["max"] > 0.2  # the bad sample is far from what the others predict


def _shapes(rng, count):
    shapes = []
    for _ in range(count):
        tokens = int(rng.choice([1, 2, 8, 32, 64, 128, 256, 512, 1024]))
        start = int(rng.integers(0, 2048))
        sampled = int(rng.integers(1, min(tokens, 64) + 1))
        shapes.append(StepShape(tokens, sampled, tokens * start + tokens * (tokens + 1) // 2, start * sampled + tokens, sampled))
    return shapes


def test_the_fit_recovers_a_known_cost_function():
    truth = FittedCostModel((1, 64, 256, 1024), (0.004, 0.006, 0.02, 0.09), (2e-9, 3e-7, 5e-5))
    rng = np.random.default_rng(2)
    fitted = FittedCostModel.fit([(s, truth.step_seconds(s)) for s in _shapes(rng, 200)])
    for shape in _shapes(rng, 50) + [StepShape(2048, 4, 2048 * 2049 // 2, 2048, 1)]:  # the last beyond every knot
        assert fitted.step_seconds(shape) == pytest.approx(truth.step_seconds(shape), rel=1e-6)
    np.testing.assert_allclose(fitted.per_term, truth.per_term, rtol=1e-5)
    again = FittedCostModel.from_dict(fitted.to_dict(), source="test")
    assert again.step_seconds(StepShape(100, 3, 5000, 300, 3)) == fitted.step_seconds(StepShape(100, 3, 5000, 300, 3))


def test_the_fit_weighs_relative_errors_so_short_steps_stay_accurate():
    """Noise of +-5% on every step: a short decode step is still predicted within the noise."""
    truth = FittedCostModel((1, 64, 256, 1024), (0.002, 0.004, 0.03, 0.2), (1e-9, 2e-7, 1e-5))
    rng = np.random.default_rng(3)
    samples = [(s, truth.step_seconds(s) * rng.uniform(0.95, 1.05)) for s in _shapes(rng, 300)]
    fitted = FittedCostModel.fit(samples)
    decode = StepShape(1, 1, 100, 100, 1)
    assert fitted.step_seconds(decode) == pytest.approx(truth.step_seconds(decode), rel=0.05)
    assert fitted.relative_errors(samples)["mean"] < 0.05


def test_the_fit_refuses_no_samples_and_nonpositive_times():
    with pytest.raises(ValueError, match="no measured steps"):
        FittedCostModel.fit([])
    with pytest.raises(ValueError, match="positive"):
        FittedCostModel.fit([(StepShape(1, 1, 1, 1, 1), 0.0)])


# ---- the roofline -------------------------------------------------------------------------------
TOY = ModelShape(num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=1, head_dim=2, vocab_size=10)
TOY_HW = Hardware("toy", peak_flops=1000.0, memory_bandwidth=100.0, memory_bytes=10**6, flops_efficiency=0.5, bandwidth_efficiency=0.5, step_overhead=0.25)


def test_the_toy_models_sizes():
    # per layer: q 4x4, k and v 4x2 each, o 4x4, MLP 3 x 4x8 = 16 + 16 + 16 + 96 = 144
    assert TOY.layer_weights == 288 and TOY.lm_head_weights == 40 and TOY.kv_values_per_token == 8  # K and V x 2 layers x 1 head x 2


def test_the_roofline_of_a_decode_step_is_bound_by_memory():
    """1 token at a context of 10, bfloat16: 500 FLOP/s and 50 B/s sustained.
    layers: max(2*288/500, 288*2/50) = 11.52; LM head: max(2*40/500, 40*2/50) = 1.6;
    attention: max(4*2*2*2*10/500, 8*2*10/50) = max(0.64, 3.2) = 3.2; plus 0.25."""
    model = RooflineCostModel(TOY, TOY_HW, bytes_per_value=2)
    assert model.step_seconds(StepShape(tokens=1, sampled=1, attended=10, context=10, requests=1)) == pytest.approx(16.57)
    assert model.is_prediction and "PREDICTED" in model.describe()


def test_the_roofline_of_a_long_prompt_chunk_is_bound_by_arithmetic():
    """100 tokens from position 0, none sampled: layers max(2*288*100/500, 11.52) = 115.2;
    attention: 4*2*2*2*5050/500 = 323.2 against 8*2*100/50 = 32; plus 0.25."""
    model = RooflineCostModel(TOY, TOY_HW, bytes_per_value=2)
    assert model.step_seconds(StepShape(tokens=100, sampled=0, attended=5050, context=100, requests=1)) == pytest.approx(438.65)


def test_hardware_descriptions_load_by_name_or_path(tmp_path):
    assert "h100" in hardware_files()
    h100 = Hardware.load("h100")
    assert h100.name == "h100" and h100.peak_flops > 1e14 and h100.memory_bytes > 1e10
    custom = tmp_path / "mine.yaml"
    custom.write_text("peak_flops: 1.0e12\nmemory_bandwidth: 1.0e11\nmemory_bytes: 1000\n")
    assert Hardware.load(str(custom)) == Hardware("mine", 1e12, 1e11, 1000)
    with pytest.raises(ValueError, match="available: .*h100"):
        Hardware.load("no-such-chip")
    custom.write_text("peak_flops: 1.0e12\nmemory_bandwidth: 1.0e11\nmemory_bytes: 1000\nclock_ghz: 2\n")
    with pytest.raises(ValueError, match="clock_ghz"):
        Hardware.load(str(custom))


# ---- step shapes --------------------------------------------------------------------------------
def _running(prompt_len, computed, scheduled, outputs=0, drafts=()):
    request = LlmRequest("r", list(range(prompt_len)), SamplingParams(max_tokens=8))
    request.output_token_ids, request.draft_token_ids = [7] * outputs, list(drafts)
    request.num_computed_tokens, request.num_scheduled_tokens = computed, scheduled
    return request


def test_step_shape_counts_chunks_decode_rows_and_drafts():
    middle_chunk = _running(prompt_len=100, computed=20, scheduled=30)  # not sampled
    last_chunk = _running(prompt_len=10, computed=4, scheduled=6)
    decode = _running(prompt_len=5, computed=7, scheduled=1, outputs=3)
    verify = _running(prompt_len=5, computed=7, scheduled=3, outputs=3, drafts=(1, 2))
    sampled = []
    shape = StepShape.of([middle_chunk, last_chunk, decode, verify], sampled)
    assert shape == StepShape(
        tokens=30 + 6 + 1 + 3,
        sampled=1 + 1 + 3,
        attended=(30 * 20 + 465) + (6 * 4 + 21) + 8 + (3 * 7 + 6),
        context=50 + 10 + 8 + 10,
        requests=4,
    )
    assert sampled == [(last_chunk, 0), (decode, 0), (verify, 2)]
