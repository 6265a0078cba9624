"""Two "nodes" on loopback: two torchrun-style launches of `python -m framework` (one rank each,
the torchrun environment set by the test) print the TP=1 output."""

from __future__ import annotations

import os
import subprocess
import sys

from framework.distributed.launch import free_port
from tests.cli.test_cli import run_cli, tiny_args
from tests.cli.test_replay_cli import THIS_CHECKOUT

EXACT = ["model.dtype=float32", "engine.backend=torch", "engine.num_threads=1"]


def answers(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if not line.startswith("[framework]")]


def test_two_torchrun_style_launches_give_the_tp1_output(tiny_dir, tmp_path):
    single = run_cli([*tiny_args(tiny_dir), *EXACT], tmp_path, env=THIS_CHECKOUT)
    assert single.returncode == 0, single.stderr
    port = str(free_port())
    args = [*tiny_args(tiny_dir), *EXACT, "engine.tensor_parallel_size=2"]
    launches = []
    for rank in (0, 1):
        torchrun = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **THIS_CHECKOUT, **torchrun}
        launches.append(subprocess.Popen(
            [sys.executable, "-m", "framework", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    try:
        (out0, err0), (out1, err1) = (p.communicate(timeout=240) for p in launches)
    finally:
        for p in launches:
            p.kill()
    assert launches[0].returncode == 0, err0
    assert launches[1].returncode == 0, err1
    assert answers(out0) == answers(single.stdout)
    assert out1 == ""  # rank 1 serves the forward only
