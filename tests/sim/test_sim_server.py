"""`python -m framework mode=serve engine=sim`: a live OpenAI-compatible server with no model,
whose steps take their predicted time on the wall clock."""

from __future__ import annotations

import os
import subprocess
import sys

from framework.cli import apply_mode_defaults
from framework.config import compose
from framework.plugins.manager import create_plugin_manager
from tests.server.test_openai_server import free_port, killed_and_read, openai_client, wait_for_health


def test_the_sim_engine_clock_follows_the_mode():
    plugins = create_plugin_manager(autoload=False)
    for mode, clock in (("serve", "wall"), ("generate", "virtual"), ("bench", "virtual")):
        cfg = compose([f"mode={mode}", "engine=sim"], plugins)
        apply_mode_defaults(cfg)
        assert cfg.engine.clock == clock
    cfg = compose(["mode=serve", "engine=sim", "engine.clock=virtual"], plugins)
    apply_mode_defaults(cfg)
    assert cfg.engine.clock == "virtual"  # an explicit setting stays
    cfg = compose(["mode=serve"], plugins)
    apply_mode_defaults(cfg)
    assert "clock" not in cfg.engine  # an engine without the setting gets none


def test_mode_serve_engine_sim_answers_the_openai_client(tiny_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["mode=serve", "engine=sim", f"model.path={tiny_dir}", "engine.eos_after=5", f"server.port={port}", "server.graceful_timeout=0.5"]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "framework", *args], env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_health(url, lambda: proc.poll() is None, timeout=120)
        with openai_client(url) as client:
            (model,) = client.models.list().data
            out = client.completions.create(model=model.id, prompt="Hello", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
            assert out.choices[0].text == "!" * 7 and out.choices[0].finish_reason == "length"  # token 17 of SmolLM2's vocabulary
            chat = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hi"}])
            assert chat.choices[0].message.content == "!" * 4 and chat.choices[0].finish_reason == "stop"  # EOS as the 5th token
            stream = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hi"}], stream=True, max_tokens=3)
            assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "!" * 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        output = killed_and_read(proc, log)
    assert "Traceback" not in output, output
