"""`engine.backend` from the command line: the choice reported, a name checked before loading, and
everything on `torch` with the C++ kernels' plugin blocked."""

from __future__ import annotations

import json

from tests.cli.test_cli import run_cli, tiny_args, workdir  # noqa: F401  (a fixture)

BLOCKED = {"FRAMEWORK_BLOCK_PLUGINS": "framework_cpu_kernels"}


def test_the_blocked_kernels_plugin_leaves_everything_on_torch(tiny_dir, workdir):
    result = run_cli([*tiny_args(tiny_dir), "run.prompts=[Hello]"], workdir, env=BLOCKED)
    assert result.returncode == 0, result.stderr
    assert "### Hello" in result.stdout and "(backend torch)" in result.stdout
    listing = json.loads(run_cli(["--list-plugins"], workdir, env=BLOCKED).stdout)
    assert [c["name"] for c in listing["components"]["backend"]] == ["torch"]
    assert all(p["name"] != "framework_cpu_kernels" for p in listing["plugins"])


def test_the_summary_says_which_backend_auto_took(tiny_dir, workdir):
    result = run_cli([*tiny_args(tiny_dir), "run.prompts=[Hello]"], workdir)
    assert result.returncode == 0, result.stderr
    assert "(backend torch)" in result.stdout or "(backend cpu_kernels)" in result.stdout


def test_an_explicit_torch_backend_runs(tiny_dir, workdir):
    result = run_cli([*tiny_args(tiny_dir), "engine.backend=torch", "engine.cuda_graphs=false", "run.prompts=[Hello]"], workdir)
    assert result.returncode == 0, result.stderr
    assert "(backend torch)" in result.stdout


def test_list_plugins_lists_the_backends(workdir):
    listing = json.loads(run_cli(["--list-plugins"], workdir).stdout)
    assert {"name": "torch", "provider": "framework"} in listing["components"]["backend"]


def test_an_unknown_backend_lists_the_choices_before_loading(tiny_dir, workdir):
    result = run_cli([*tiny_args(tiny_dir), "engine.backend=nope"], workdir)
    assert result.returncode == 2
    assert "unknown backend 'nope'" in result.stderr and "auto (built in)" in result.stderr and "torch (framework)" in result.stderr
    assert "Traceback" not in result.stderr
