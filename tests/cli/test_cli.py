"""`python -m framework` as a user runs it: in a subprocess, from an empty working directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_cli(args, cwd, env=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "framework", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "cwd"
    path.mkdir()
    return path


def tiny_args(tiny_dir):
    return [f"model.path={tiny_dir}", "run.chat=false", "run.max_tokens=5", "kv_cache.max_tokens=512"]


def test_generates_and_leaves_the_directory_clean(tiny_dir, workdir):
    result = run_cli([*tiny_args(tiny_dir), "scheduler=max_utilization", "kv_cache.block_size=8", 'run.prompts=["Hello","Bye"]'], workdir)
    assert result.returncode == 0, result.stderr
    assert "### Hello" in result.stdout and "### Bye" in result.stdout
    assert "scheduler max_utilization+fcfs" in result.stdout
    assert "blocks of 8" in result.stdout
    assert list(workdir.iterdir()) == []  # no outputs/, no .hydra/


def test_list_plugins_is_json(workdir):
    result = run_cli(["--list-plugins"], workdir)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    names = {kind: [c["name"] for c in comps] for kind, comps in listing["components"].items()}
    assert {"guaranteed_no_evict", "max_utilization", "static_batch"} <= set(names["capacity_scheduler"])
    assert "fcfs" in names["micro_batch_scheduler"] and "paged" in names["kv_cache_manager"]
    assert "LlamaForCausalLM" in names["model"]
    assert any(p["builtin"] for p in listing["plugins"])


def test_unknown_name_lists_choices_without_traceback(workdir):
    result = run_cli(["scheduler=nope"], workdir)
    assert result.returncode == 2
    assert "unknown scheduler 'nope'" in result.stderr
    assert "max_utilization (framework)" in result.stderr and "fcfs (framework)" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_name_in_a_field_fails_before_loading(tiny_dir, workdir):
    result = run_cli([*tiny_args(tiny_dir), "scheduler.capacity=nope"], workdir)
    assert result.returncode == 2
    assert "unknown capacity scheduler 'nope'" in result.stderr and "guaranteed_no_evict (framework)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "override, message",
    [("scheduler.max_batch_size=lots", "could not be converted to Integer"), ("model.dtype=float8", "model.dtype must be one of")],
)
def test_bad_values_are_clear_errors(tiny_dir, workdir, override, message):
    result = run_cli([*tiny_args(tiny_dir), override], workdir)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_hydra_help_and_cfg(workdir):
    help_text = run_cli(["--help"], workdir)
    assert help_text.returncode == 0
    for group in ("scheduler", "kv_cache", "decoder", "engine", "model"):
        assert f"{group}:" in help_text.stdout
    assert "max_utilization" in help_text.stdout and "equal_progress" in help_text.stdout
    cfg = run_cli(["--cfg", "job", "scheduler=static_batch", "kv_cache.block_size=32"], workdir)
    assert cfg.returncode == 0, cfg.stderr
    assert "capacity: static_batch" in cfg.stdout and "block_size: 32" in cfg.stdout
    assert list(workdir.iterdir()) == []


def test_multirun_sweep_runs_each_configuration(tiny_dir, workdir, tmp_path):
    result = run_cli(
        ["-m", *tiny_args(tiny_dir), "scheduler=fcfs,max_utilization", 'run.prompts=["Hi"]'],
        workdir,
        env={"TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "scheduler guaranteed_no_evict+fcfs" in result.stdout
    assert "scheduler max_utilization+fcfs" in result.stdout
    assert list(workdir.iterdir()) == []


def test_user_logging_is_left_alone(tiny_dir, workdir):
    # Hydra's job logging is off: nothing is written to a framework.log, and no logging handlers appear.
    result = run_cli([*tiny_args(tiny_dir), "--cfg", "hydra"], workdir)
    assert result.returncode == 0, result.stderr
    assert "name: framework" in result.stdout
    assert "output_subdir: null" in result.stdout
    assert list(workdir.iterdir()) == []
