"""`mode=bench` runs the standard workloads and prints one JSON line each (no timing asserted)."""

import json

from tests.cli.test_cli import run_cli


def test_bench_smoke_prints_json_for_each_workload(tiny_dir, tmp_path):
    result = run_cli(
        [
            "mode=bench",
            f"model.path={tiny_dir}",
            "kv_cache.max_tokens=8192",
            "scheduler.max_num_tokens=64",  # W3's prompts span steps, so later ones reuse the prefix
            "bench.workload='W2,W3'",  # quoted: a bare comma list is a Hydra sweep
            "bench.scale=0.1",
            "bench.runs=1",
            "bench.warmup=false",
            "bench.compare=true",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["workload"] for r in rows] == ["W2", "W3"]
    for row in rows:
        for key in ("output_tok_s", "total_tok_s", "wall_s", "gflops", "matmul_peak_gflops", "peak_share",
                    "mean_step_ms", "host_overhead", "prefix_hit_rate", "cold_start_s"):
            assert isinstance(row[key], (int, float)) and row[key] >= 0, key
        assert row["output_tok_s"] > 0 and 0 < row["peak_share"]
        assert row["backend"] in ("torch", "cpu_kernels")  # the one engine.backend=auto took
        assert row["speedup_vs_static"] and row["speedup_vs_static"] > 0  # transformers generate ran
        assert "speedup_vs_continuous" in row
    assert rows[1]["prefix_hit_rate"] > 0  # W3's shared prefix is reused
    assert list(tmp_path.iterdir()) == []


def test_bench_rejects_an_unknown_workload(tiny_dir, tmp_path):
    result = run_cli(["mode=bench", f"model.path={tiny_dir}", "kv_cache.max_tokens=1024", "bench.workload=W9"], tmp_path)
    assert result.returncode == 2 and "unknown workload 'W9'" in result.stderr


def test_matmul_peak_is_the_best_measured_so_far(tiny_dir, monkeypatch):
    from framework import LLM
    from framework.bench import runner

    readings = iter([200.0, 100.0, 400.0])  # at start, then after each of the two workloads
    monkeypatch.setattr(runner, "matmul_peak_gflops", lambda dtype, device: next(readings))
    llm = LLM(str(tiny_dir), **{"kv_cache.max_tokens": 8192, "bench.workload": "W2,W3", "bench.scale": 0.1,
                                "bench.runs": 1, "bench.warmup": False})
    rows = runner.run_benchmark(llm.config, llm, tiny_dir, cold_start_s=0.0)
    assert [r["matmul_peak_gflops"] for r in rows] == [200.0, 400.0]
    assert rows[1]["peak_share"] == rows[1]["gflops"] / 400.0


def test_bench_w5_measures_the_drafter_beside_plain_steps(tmp_path):
    """On SmolLM2 itself: W5 is real text the model copies, so the drafter has something to find."""
    result = run_cli(
        [
            "mode=bench", "kv_cache.max_tokens=8192", "bench.workload=W5",
            "bench.scale=0.1", "bench.runs=1", "bench.warmup=false", "speculative=ngram",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["workload"], r["speculative"]) for r in rows] == [("W5", "none"), ("W5", "ngram")]
    plain, drafted = rows
    assert plain["draft_tokens"] == 0 and drafted["draft_tokens"] > 0
    assert drafted["same_output_as_plain"] is True and drafted["speedup_vs_plain"] > 0
    assert 0 < plain["output_tokens"] == drafted["output_tokens"] <= 26
