"""A bounded fuzz of the server: a few hundred generated hostile bodies, each answered with a 200 or
an OpenAI-shaped 4xx (never a 5xx, never a hang); afterwards the server answers the reference
request identically and holds no KV block."""

from __future__ import annotations

import json
import random

import pytest

from tests.server.test_openai_server import MODEL, RunningServer, httpx, new_llm

HOSTILE = [
    None, True, False, -1, 0, 1, 2**31, 2**64, 2**70, 0.5, -0.5, 1e308, "", "x", "NaN", "\ud800", [], [1], [-1],
    [2**70], [99999999], ["stop"], [""], ["a" * 3000], {"a": 1}, [1.5], [None], [True], [[1, 2]], "a" * 5000,
]
COMPLETION_FIELDS = [
    "prompt", "max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "min_tokens", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
    "skip_special_tokens", "stream", "stream_options", "model", "include_stop_str_in_output",
]
CHAT_FIELDS = [f for f in COMPLETION_FIELDS if f not in ("prompt", "logprobs")] + [
    "messages", "max_completion_tokens", "logprobs", "top_logprobs",
]
RAW_BODIES = [
    b"", b"{", b"not json", b"\xff\xfe\x00", b"[" * 5000 + b"]" * 5000, b'{"prompt": NaN, "model": "tiny"}',
    b'{"prompt": "hi", "max_tokens": Infinity}', b'{"prompt": "a\\ud800b"}', b"null", b"[]", b'"a string"',
]
REFERENCE = {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def bodies(rng: random.Random, count: int):
    for i in range(count):
        if i % 10 == 0:
            yield "/v1/completions", rng.choice(RAW_BODIES)
            continue
        chat = rng.random() < 0.4
        body = (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
            if chat
            else {"model": MODEL, "prompt": [rng.randrange(3, 49152) for _ in range(3)], "max_tokens": 3, "temperature": 0}
        )
        if rng.random() < 0.8:
            for field in rng.sample(CHAT_FIELDS if chat else COMPLETION_FIELDS, rng.randint(1, 2)):
                body[field] = rng.choice(HOSTILE)
        text = json.dumps(body)  # lone surrogates survive as \ud800 escapes
        yield ("/v1/chat/completions" if chat else "/v1/completions"), text.encode()


@pytest.fixture(scope="module")
def server(tiny_dir):
    running = RunningServer(new_llm(tiny_dir))
    yield running
    running.stop()


def test_a_few_hundred_hostile_bodies_get_clean_answers(server):
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as client:
        reference = client.post("/v1/completions", json=REFERENCE).json()["choices"][0]["text"]
        counts = {"ok": 0, "clean_error": 0}
        for path, body in bodies(random.Random(17), 250):
            response = client.post(path, content=body, headers={"content-type": "application/json"})
            assert response.status_code < 500, f"{response.status_code} for {body[:120]!r}: {response.text[:300]}"
            if response.status_code == 200:
                counts["ok"] += 1
                if "text/event-stream" in response.headers.get("content-type", ""):
                    assert response.text.rstrip().endswith("data: [DONE]")
                else:
                    assert all(c["finish_reason"] in ("stop", "length") for c in response.json()["choices"])
            else:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
                counts["clean_error"] += 1
        print(f"server fuzz: {counts}")
        assert counts["ok"] > 20 and counts["clean_error"] > 100, counts
        assert client.get("/health").status_code == 200
        again = client.post("/v1/completions", json=REFERENCE).json()["choices"][0]["text"]
    assert again == reference
    assert server.llm.kv_cache_stats.num_used_blocks == 0
