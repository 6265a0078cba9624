"""Trace readers (Azure CSV, Mooncake JSONL), arrival processes, length distributions and the
workload built from them."""

import json

import numpy as np
import pytest

from framework.config import LengthConfig, ReplayConfig, TenantConfig
from framework.replay.arrivals import arrival_times, draw_lengths, fit_lognormal
from framework.replay.traces import TraceFormatError, TraceRecord, read_trace
from framework.replay.workload import build_workload

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109

2023-11-16 18:15:51.2224670,879,55
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def mooncake_lines(*entries):
    return "".join(json.dumps(e) + "\n" for e in entries)


def test_azure_csv(tmp_path):
    records = read_trace(write(tmp_path, "t.csv", AZURE))
    assert [(r.input_len, r.output_len, r.hash_ids) for r in records] == [(374, 44, None), (396, 109, None), (879, 55, None)]
    assert [r.timestamp for r in records] == pytest.approx([0.0, 4.314579, 4.541877], abs=1e-5)


def test_mooncake_jsonl(tmp_path):
    text = mooncake_lines(
        {"timestamp": 1000, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 3500, "input_length": 100, "output_length": 7, "hash_ids": [0]},
    )
    records = read_trace(write(tmp_path, "t.jsonl", text + "\n"))
    assert records == [TraceRecord(0.0, 600, 5, (0, 1)), TraceRecord(2.5, 100, 7, (0,))]


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("TIMESTAMP,Context,Generated\n", 1, "the header must be TIMESTAMP,ContextTokens,GeneratedTokens"),
        (AZURE + "2023-11-16 18:15:52.0,12\n", 6, "expected 3 fields, got 2"),
        (AZURE + "2023-11-16 18:15:52.0,twelve,3\n", 6, "ContextTokens must be a whole number, got 'twelve'"),
        (AZURE + "2023-11-16 18:15:52.0,12,-3\n", 6, "GeneratedTokens must not be negative"),
        (AZURE + "yesterday,12,3\n", 6, "TIMESTAMP must look like"),
    ],
)
def test_azure_malformed_lines_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(TraceFormatError, match=f"^{path}:{line}: {message}"):
        read_trace(path)


GOOD = {"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"timestamp": 5, "input_length": 3}), "missing output_length"),
        (json.dumps({**GOOD, "timestamp": "soon"}), "timestamp must be a non-negative number"),
        (json.dumps({**GOOD, "hash_ids": [1, "x"]}), "hash_ids must be a list of integers"),
        (json.dumps({**GOOD, "input_length": 1.5}), "input_length must be a whole number"),
        (json.dumps({**GOOD, "input_length": 513}), "1 hash_ids of 512 tokens cannot cover input_length 513"),
    ],
)
def test_mooncake_malformed_lines_name_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, "bad.jsonl", mooncake_lines(GOOD, GOOD) + bad + "\n")
    with pytest.raises(TraceFormatError, match=f"^{path}:3: {message}"):
        read_trace(path)


def test_format_by_suffix_or_name(tmp_path):
    path = write(tmp_path, "trace.txt", AZURE)
    with pytest.raises(ValueError, match="set replay.trace_format=azure|mooncake"):
        read_trace(path)
    assert len(read_trace(path, "azure")) == 3
    with pytest.raises(ValueError, match="no such file"):
        read_trace(tmp_path / "missing.csv")
    with pytest.raises(TraceFormatError, match="holds no requests"):
        read_trace(write(tmp_path, "empty.jsonl", "\n"))


# ---- arrivals and lengths ----------------------------------------------------------------------
def cv(values):
    return float(np.std(values) / np.mean(values))


def test_arrivals_are_seeded_and_have_the_asked_rate_and_burstiness():
    poisson = arrival_times(4000, 8.0, "poisson", 1.0, np.random.default_rng(1))
    assert poisson[0] == 0 and np.all(np.diff(poisson) >= 0)
    assert np.array_equal(poisson, arrival_times(4000, 8.0, "poisson", 1.0, np.random.default_rng(1)))
    assert 4000 / poisson[-1] == pytest.approx(8.0, rel=0.05)
    assert cv(np.diff(poisson)) == pytest.approx(1.0, abs=0.1)
    bursty = arrival_times(4000, 8.0, "gamma", 0.25, np.random.default_rng(1))
    assert 4000 / bursty[-1] == pytest.approx(8.0, rel=0.1)
    assert cv(np.diff(bursty)) == pytest.approx(2.0, abs=0.2)  # 1 / sqrt(shape)
    assert np.array_equal(arrival_times(3, float("inf"), "poisson", 1.0, np.random.default_rng(0)), [0, 0, 0])
    with pytest.raises(ValueError, match="replay.arrival must be one of poisson, gamma"):
        arrival_times(3, 1.0, "uniform", 1.0, np.random.default_rng(0))


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert draw_lengths(LengthConfig("fixed", value=7), 3, rng, "x").tolist() == [7, 7, 7]
    uniform = draw_lengths(LengthConfig("uniform", min=4, max=6), 500, rng, "x")
    assert set(uniform.tolist()) == {4, 5, 6}
    zipf = draw_lengths(LengthConfig("zipf", min=10, max=50, zipf_a=1.2), 500, rng, "x")
    counts = np.bincount(zipf, minlength=51)
    assert zipf.min() >= 10 and zipf.max() <= 50 and counts[10] > counts[11] > counts[20] > counts[50]  # heavy at the short end
    lognormal = draw_lengths(LengthConfig("lognormal", value=100, sigma=0.5, min=1, max=10_000), 4000, rng, "x")
    assert np.median(lognormal) == pytest.approx(100, rel=0.05)
    with pytest.raises(ValueError, match="replay.input.dist must be one of fixed, uniform, zipf, lognormal"):
        draw_lengths(LengthConfig("normal"), 3, rng, "replay.input")
    with pytest.raises(ValueError, match="replay.output: need 1 <= min <= max"):
        draw_lengths(LengthConfig("uniform", min=9, max=3), 3, rng, "replay.output")


def test_lognormal_fitted_to_lengths():
    median, sigma = fit_lognormal([np.e, np.e**3])
    assert median == pytest.approx(np.e**2) and sigma == pytest.approx(1.0)


# ---- workloads -------------------------------------------------------------------------------
VOCAB = np.arange(100, 1100)


def test_synthetic_workload_is_seeded():
    cfg = ReplayConfig(num_requests=20, rate=4.0, input=LengthConfig("uniform", min=3, max=9), output=LengthConfig(value=5))
    first, again = build_workload(cfg, VOCAB), build_workload(cfg, VOCAB)
    assert first.requests == again.requests
    assert all(3 <= len(r.prompt_token_ids) <= 9 and r.output_len == 5 for r in first.requests)
    assert all(set(r.prompt_token_ids) <= set(VOCAB.tolist()) for r in first.requests)
    cfg.seed = 1
    assert build_workload(cfg, VOCAB).requests != first.requests
    assert first.description == {"arrivals": "poisson", "rate": 4.0, "input": "uniform in [3, 9]", "output": "fixed 5"}


def test_trace_workload_scales_time_and_lengths_and_clips(tmp_path):
    cfg = ReplayConfig(trace=str(write(tmp_path, "t.csv", AZURE)), time_scale=0.5, length_scale=0.1, max_output_len=8)
    workload = build_workload(cfg, VOCAB)
    assert [len(r.prompt_token_ids) for r in workload.requests] == [37, 40, 88]
    assert [r.output_len for r in workload.requests] == [4, 8, 6]  # 10.9 was clipped to 8
    assert [r.arrival for r in workload.requests] == pytest.approx([0.0, 2.1572895, 2.2709385], abs=1e-5)
    assert workload.description["outputs_clipped"] == "1 (to 8)"
    cfg.num_requests = 2
    assert len(build_workload(cfg, VOCAB).requests) == 2


def test_shared_hash_ids_become_shared_prompt_blocks(tmp_path):
    text = mooncake_lines(
        {"timestamp": 0, "input_length": 1200, "output_length": 3, "hash_ids": [0, 1, 2]},
        {"timestamp": 10, "input_length": 1100, "output_length": 3, "hash_ids": [0, 1, 3]},
        {"timestamp": 20, "input_length": 500, "output_length": 3, "hash_ids": [4]},
    )
    cfg = ReplayConfig(trace=str(write(tmp_path, "t.jsonl", text)), length_scale=1 / 64)  # 8-token blocks
    a, b, c = build_workload(cfg, VOCAB).requests
    assert (len(a.prompt_token_ids), len(b.prompt_token_ids), len(c.prompt_token_ids)) == (19, 17, 8)
    assert a.prompt_token_ids[:16] == b.prompt_token_ids[:16]  # blocks 0 and 1
    assert a.prompt_token_ids[16:19] != b.prompt_token_ids[16:19]
    assert a.prompt_token_ids[:8] != c.prompt_token_ids[:8]


def test_tenants_are_drawn_by_share_and_change_nothing_else():
    cfg = ReplayConfig(num_requests=400, rate=4.0)
    plain = build_workload(cfg, VOCAB)
    cfg.tenants = [TenantConfig("flood", share=3, priority=1), TenantConfig("chat", priority=0)]
    mixed, again = build_workload(cfg, VOCAB), build_workload(cfg, VOCAB)
    assert mixed.requests == again.requests
    assert [(r.arrival, r.prompt_token_ids, r.output_len) for r in mixed.requests] == [(r.arrival, r.prompt_token_ids, r.output_len) for r in plain.requests]
    senders = [(r.tenant, r.priority) for r in mixed.requests]
    assert set(senders) == {("flood", 1), ("chat", 0)}
    assert 0.7 < senders.count(("flood", 1)) / 400 < 0.8
    assert mixed.description["tenants"] == "flood 75% (priority 1), chat 25% (priority 0)"
    assert all(r.tenant is None and r.priority is None for r in plain.requests) and "tenants" not in plain.description


@pytest.mark.parametrize(
    "tenants, message",
    [
        ([TenantConfig("a"), TenantConfig("a")], "distinct non-empty names"),
        ([TenantConfig("")], "distinct non-empty names"),
        ([TenantConfig("a", share=0)], "every share must be a positive number"),
    ],
)
def test_bad_tenants_are_clear_errors(tenants, message):
    with pytest.raises(ValueError, match=message):
        build_workload(ReplayConfig(num_requests=2, tenants=tenants), VOCAB)
