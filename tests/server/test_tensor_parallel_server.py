"""`python -m framework mode=serve engine.tensor_parallel_size=2`: rank 0 serves an OpenAI-style
completion with the greedy text of TP=1, and once SIGTERM has stopped it no rank process is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from framework import LLM, SamplingParams
from tests.cli.test_replay_cli import THIS_CHECKOUT
from tests.integration.test_tensor_parallel import _running
from tests.server.test_openai_server import GREEDY, free_port, killed_and_read, openai_client, wait_for_health

EXACT = {"dtype": "float32", "backend": "torch", "num_threads": 1, "kv_cache.max_tokens": 2048}


def rank_processes(parent: int) -> list[int]:
    """The pids of the tensor-parallel workers process `parent` started."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):  # (gone meanwhile)
            continue
        if ppid == parent and b"framework.distributed.worker" in command:
            pids.append(int(stat.parent.name))
    return pids


def test_a_tp2_server_answers_like_tp1_and_leaves_no_rank_behind(tiny_dir, tmp_path):
    prompt = "The capital of France is"
    with LLM(str(tiny_dir), **EXACT) as tp1:
        want = tp1.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        f"model.path={tiny_dir}", "mode=serve", "engine.tensor_parallel_size=2", "model.dtype=float32", "engine.backend=torch",
        "engine.num_threads=1", "kv_cache.max_tokens=2048", f"server.port={port}", "server.graceful_timeout=0.5",
    ]
    log = open(tmp_path / "server.log", "w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **THIS_CHECKOUT}
    proc = subprocess.Popen([sys.executable, "-m", "framework", *args], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_health(url, lambda: proc.poll() is None, timeout=120)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 1
        with openai_client(url) as client:
            out = client.completions.create(model=Path(tiny_dir).name, prompt=prompt, max_tokens=8, **GREEDY)
        assert out.choices[0].text == want
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        output = killed_and_read(proc, log)
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), output
    assert "Traceback" not in output, output
    assert not [pid for pid in ranks if _running(pid)]  # stopped and waited for by rank 0 before it exited
