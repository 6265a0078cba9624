"""Faults under the server: a plugin component that raises for one client's request fails that
request only, while another client's stream runs on; when the executor loop itself breaks, every
waiting client hears of it at once, /health turns 503 and new requests are refused."""

from __future__ import annotations

import json
import threading

import pytest

from framework import LLM
from framework.plugins.manager import create_plugin_manager
from tests.integration.test_faults import POISON, Fault, FaultyPlugin
from tests.server.test_openai_server import MODEL, RunningServer, httpx

LONG = {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 40, "temperature": 0, "ignore_eos": True}


def faulty_llm(tiny_dir, **options):
    plugins = create_plugin_manager(extra_plugins=[FaultyPlugin()], autoload=False)
    return LLM(str(tiny_dir), plugins=plugins, dtype="float32", **{"kv_cache.max_tokens": 1024}, **options)


def stream_completion(url, body, chunks):
    with httpx.Client(timeout=60, trust_env=False) as client:
        with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[len("data: "):]))


@pytest.mark.parametrize("point, options", [("decoder", {"decoder": "faulty_decoder"}), ("capacity", {"scheduler": "faulty_capacity"})])
def test_one_clients_poisoned_request_leaves_another_clients_stream_alone(tiny_dir, monkeypatch, point, options):
    monkeypatch.setattr(Fault, "point", point)
    monkeypatch.setattr(Fault, "mode", "poison")
    monkeypatch.setattr(Fault, "raised", 0)
    server = RunningServer(faulty_llm(tiny_dir, **options))
    try:
        expected = server.llm.generate([5, 6, 7, 8], _params(40), use_tqdm=False)[0].outputs[0].text
        chunks: list[dict] = []
        streamer = threading.Thread(target=stream_completion, args=(server.url, LONG, chunks))
        streamer.start()
        with httpx.Client(timeout=60, trust_env=False) as client:
            poisoned = client.post(f"{server.url}/v1/completions", json={**LONG, "max_tokens": 4, "seed": POISON})
            later = client.post(f"{server.url}/v1/completions", json={**LONG, "max_tokens": 4})
            health = client.get(f"{server.url}/health")
        streamer.join(timeout=60)
        assert Fault.raised >= 1
        assert poisoned.json()["choices"][0]["finish_reason"] == "error"
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert later.status_code == 200 and later.json()["choices"][0]["finish_reason"] == "length"
        assert health.status_code == 200
        assert server.llm.kv_cache_stats.num_used_blocks == 0
    finally:
        server.stop()


def _params(max_tokens):
    from framework import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_a_broken_loop_answers_everyone_and_turns_health_unhealthy(tiny_dir, monkeypatch):
    llm = faulty_llm(tiny_dir)
    executor = llm.executor
    real_run, calls = executor._run, {"n": 0}

    def broken_run(scheduled):
        calls["n"] += 1
        if calls["n"] == 5:
            raise AssertionError("executor bug")
        return real_run(scheduled)

    monkeypatch.setattr(executor, "_run", broken_run)
    server = RunningServer(llm)
    try:
        chunks: list[dict] = []
        streamer = threading.Thread(target=stream_completion, args=(server.url, {**LONG, "max_tokens": 500}, chunks))
        streamer.start()
        streamer.join(timeout=60)
        assert not streamer.is_alive()  # told at once, not left waiting
        assert chunks[-1]["choices"][0]["finish_reason"] == "error"
        with httpx.Client(timeout=10, trust_env=False) as client:
            health = client.get(f"{server.url}/health")
            refused = client.post(f"{server.url}/v1/completions", json={**LONG, "max_tokens": 2})
        assert health.status_code == 503 and "executor bug" in health.json()["error"]["message"]
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "engine_error"
        assert llm.kv_cache_stats.num_used_blocks == 0
    finally:
        server.stop()
