"""`python -m framework mode=replay` as a user runs it: in a subprocess, from an empty directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cli.test_cli import run_cli

REPO = Path(__file__).parents[2]
THIS_CHECKOUT = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def replay_args(tiny_dir):
    return [
        "mode=replay", f"model.path={tiny_dir}", "kv_cache.max_tokens=512", "replay.num_requests=4", "replay.rate=20",
        "replay.input.value=8", "replay.output.value=3", "replay.progress=false",
    ]


def test_a_replay_writes_its_report_into_the_run_directory(tiny_dir, tmp_path):
    result = run_cli(replay_args(tiny_dir), tmp_path, env=THIS_CHECKOUT)
    assert result.returncode == 0, result.stderr
    assert "4 completed, 0 failed" in result.stdout and "TTFT" in result.stdout
    document = json.loads((tmp_path / "replay.json").read_text())
    assert document["statistics"]["output_tokens"] == 12
    assert (tmp_path / "replay.png").exists()


def test_wall_clock_replicas_and_bad_traces_are_clear_errors(tiny_dir, tmp_path):
    result = run_cli([*replay_args(tiny_dir), "replay.replicas=2"], tmp_path, env=THIS_CHECKOUT)
    assert result.returncode == 2
    assert "replay.replicas=2 needs engines on virtual clocks" in result.stderr
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 5, "output_length": 2, "hash_ids": [0]}\n{"timestamp": 1}\n')
    result = run_cli([*replay_args(tiny_dir), f"replay.trace={trace}"], tmp_path, env=THIS_CHECKOUT)
    assert result.returncode == 2
    assert f"{trace}:2: missing input_length, output_length" in result.stderr
    result = run_cli([*replay_args(tiny_dir), "replay.router=nearest"], tmp_path, env=THIS_CHECKOUT)
    assert result.returncode == 2 and "unknown router 'nearest'; available: round_robin (framework)" in result.stderr


def test_a_simulated_cluster_says_its_figures_are_predicted(tmp_path):
    args = ["mode=replay", "engine=sim", "replay.replicas=2", "replay.router=least_loaded", "replay.num_requests=20",
            "replay.rate=50", "replay.progress=false"]
    result = run_cli(args, tmp_path, env=THIS_CHECKOUT)
    assert result.returncode == 0, result.stderr
    assert "SIMULATED: PREDICTED step times: a roofline of h100" in result.stdout
    document = json.loads((tmp_path / "replay.json").read_text())
    assert document["setup"]["simulated"].startswith("PREDICTED") and document["setup"]["clock"] == "VirtualClock"
    assert document["statistics"]["completed"] == 20
