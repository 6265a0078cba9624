"""The OpenAI-compatible server, run for real on a loopback port and driven by the official `openai`
client (raw HTTP where that client would not send the request). Expected answers come from a
separate offline LLM on the same checkpoint."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

try:
    import httpx
except ImportError:  # some environments ship httpx under the name httpx2 (the openai client's dependency)
    import httpx2 as httpx

from framework import LLM, SamplingParams
from framework.server.app import build_app
from framework.testing import watch
from tests.conftest import TINY_VOCAB

MODEL = "tiny"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
METRIC_NAMES = [
    "framework_requests_running",
    "framework_requests_running_peak",
    "framework_requests_waiting",
    "framework_kv_cache_usage_ratio",
    "framework_kv_cache_free_blocks",
    "framework_prefix_cache_hit_rate",
    "framework_engine_steps_total",
    "framework_requests_total",
    "framework_prompt_tokens_total",
    "framework_generation_tokens_total",
    "framework_time_to_first_token_seconds",
    "framework_time_per_output_token_seconds",
    "framework_request_queue_time_seconds",
    "framework_scheduler_cpu_seconds_total",
    "framework_scheduler_passes_total",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, alive, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server at {url} died while starting")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the server at {url} did not answer /health within {timeout}s")


def killed_and_read(proc, log) -> str:
    """Kill `proc` if it still runs, then the text of its `log` (a file it wrote to), closed."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.seek(0)
    output = log.read()
    log.close()
    return output


class RunningServer:
    """build_app + uvicorn on a free loopback port, on a background thread."""

    def __init__(self, llm, api_key=None, **settings):
        import uvicorn

        self.llm = llm
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = build_app(llm, MODEL, api_key=api_key, **settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        wait_for_health(self.url, self.thread.is_alive, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10, trust_env=False).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values


def openai_client(url: str, api_key: str = "unused", timeout: float = 60) -> openai.OpenAI:
    # loopback only: ignore any proxy settings in the environment
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout, http_client=openai.DefaultHttpxClient(trust_env=False)
    )


def new_llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", **{"kv_cache.max_tokens": 8192})


@pytest.fixture(scope="module")
def offline(tiny_dir):
    llm = new_llm(tiny_dir)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def served(tiny_dir):
    server = RunningServer(new_llm(tiny_dir))
    yield server
    server.stop()
    assert server.llm._thread is None  # the lifespan shut the executor loop down


@pytest.fixture(scope="module")
def client(served):
    with openai_client(served.url) as c:
        yield c


@pytest.fixture
def raw(served):
    with httpx.Client(base_url=served.url, timeout=60, trust_env=False) as c:
        yield c


def expected(offline, prompt, max_tokens, **params):
    params = {"temperature": 0.0, "ignore_eos": True, **params}
    return offline.generate(prompt, SamplingParams(max_tokens=max_tokens, **params), use_tqdm=False)[0].outputs[0]


def token_prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(n)] for n in lengths]


def assert_still_serving(client, offline):
    prompt = "The server still answers"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, **GREEDY)
    assert out.choices[0].text == expected(offline, prompt, 6).text
    assert out.choices[0].finish_reason == "length"


# ---- /v1/completions ----------------------------------------------------------------------------


def test_completion_greedy_matches_offline(client, offline):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    want = expected(offline, prompt, 12)
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert len(out.choices) == 1
    assert out.choices[0].text == want.text and out.choices[0].index == 0
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == len(want.token_ids) == 12
    assert out.usage.prompt_tokens == len(offline.tokenizer.encode(prompt))
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_completion_on_the_server_llm_while_it_serves(served, client, offline):
    # The offline API still works on an LLM whose background loop is serving HTTP clients.
    out = served.llm.generate("Hello", SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].text == expected(offline, "Hello", 5).text
    assert_still_serving(client, offline)


def test_list_of_prompts_with_n(client, offline):
    prompts = ["One fish", "Two fish, red fish", "Blue fish"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=7, n=2, **GREEDY)
    assert [c.index for c in out.choices] == list(range(6))
    for choice in out.choices:
        assert choice.text == expected(offline, prompts[choice.index // 2], 7).text
        assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == sum(len(offline.tokenizer.encode(p)) for p in prompts)
    assert out.usage.completion_tokens == 6 * 7


def test_token_id_prompts(client, offline):
    prompts = token_prompts([5, 23], seed=1)
    single = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=5, **GREEDY)
    assert single.choices[0].text == expected(offline, prompts[0], 5).text
    assert single.usage.prompt_tokens == 5
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, **GREEDY)
    assert [c.text for c in batch.choices] == [expected(offline, p, 5).text for p in prompts]


def pick_stop(text: str) -> str:
    """A 3-character ASCII alphanumeric piece from the second half of `text`."""
    for start in range(len(text) // 2, len(text) - 3):
        piece = text[start : start + 3]
        if piece.isascii() and piece.isalnum():
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_the_text(client, offline, include):
    prompt = "Once upon a time"
    full = expected(offline, prompt, 24).text
    stop = pick_stop(full)
    cut = full.index(stop) + (len(stop) if include else 0)
    extra = {"ignore_eos": True, "include_stop_str_in_output": include}
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "never-seen"], extra_body=extra)
    choice = out.choices[0]
    assert choice.text == full[:cut]
    assert choice.finish_reason == "stop"
    assert out.usage.completion_tokens < 24
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True, extra_body=extra
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_logprobs(client, offline):
    prompt = "Logprobs, please"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, logprobs=2, **GREEDY)
    want = expected(offline, prompt, 6, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.tokens == [offline.tokenizer.decode([t]) for t in want.token_ids]
    for i, (token_id, position) in enumerate(zip(want.token_ids, want.logprobs)):
        assert lp.token_logprobs[i] == pytest.approx(position[token_id].logprob, abs=1e-4)
        top = lp.top_logprobs[i]
        assert 1 <= len(top) <= 2 and lp.tokens[i] in top  # greedy: the chosen token is the top one
        assert max(top.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_seed_reproduces_sampling(client, offline):
    prompt = "Random words:"
    runs = [
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, seed=1234, extra_body={"ignore_eos": True})
        for _ in range(2)
    ]
    assert runs[0].choices[0].text == runs[1].choices[0].text
    assert runs[0].choices[0].text == expected(offline, prompt, 12, temperature=1.0, seed=1234).text


# ---- /v1/chat/completions -----------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def chat_expected(offline, max_tokens, **params):
    return expected(offline, offline.chat_prompt(MESSAGES), max_tokens, **params)


def test_chat_matches_offline(client, offline):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, **GREEDY)
    want = chat_expected(offline, 10)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    message = out.choices[0].message
    assert message.role == "assistant" and message.content == want.text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(offline.chat_prompt(MESSAGES))
    assert out.usage.completion_tokens == 10
    # max_completion_tokens is the newer spelling
    newer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=4, **GREEDY)
    assert newer.usage.completion_tokens == 4 and newer.choices[0].message.content == chat_expected(offline, 4).text


def test_chat_stream_joins_to_the_full_answer(client, offline):
    want = chat_expected(offline, 10).text
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_chat_stream_with_n_and_usage(client, offline):
    want = chat_expected(offline, 8).text
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, n=2, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    texts, roles, finish = {0: "", 1: ""}, set(), {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add(choice.index)
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert roles == {0, 1}
    assert texts == {0: want, 1: want}
    assert finish == {0: "length", 1: "length"}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 16
    assert usage_chunk.usage.prompt_tokens == len(offline.chat_prompt(MESSAGES))


def test_chat_logprobs(client, offline):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2, **GREEDY)
    want = chat_expected(offline, 5, logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry, token_id, position in zip(content, want.token_ids, want.logprobs):
        assert entry.token == offline.tokenizer.decode([token_id])
        assert entry.logprob == pytest.approx(position[token_id].logprob, abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    streamed = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2, stream=True, **GREEDY
    )
    tokens = [e.token for c in streamed for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert tokens == [e.token for e in content]


# ---- the other endpoints ------------------------------------------------------------------------


def test_scheduling_metadata_in_the_body_reaches_the_scheduler(served, client):
    seen = {}

    def before(active, kv_cache):
        seen.update({r.prompt_token_ids[0]: (r.priority, r.tenant, r.ttft_slo_ms) for r in active})
        return lambda out: None

    with watch(served.llm.executor.capacity_scheduler, "schedule", before):
        client.completions.create(model=MODEL, prompt=[901, 1], max_tokens=2, extra_body={"priority": -1, "tenant": "acme", "ttft_slo_ms": 250})
        client.completions.create(model=MODEL, prompt=[902, 1], max_tokens=2, user="alice")  # OpenAI's `user`: the tenant
        client.completions.create(model=MODEL, prompt=[903, 1], max_tokens=2, user="alice", extra_body={"tenant": "acme"})
        client.completions.create(model=MODEL, prompt=[904, 1], max_tokens=2, user="")
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, user="bob", extra_body={"priority": 3, "ttft_slo_ms": 1.5})
    chat = [v for k, v in seen.items() if k not in (901, 902, 903, 904)]
    assert [seen[k] for k in (901, 902, 903, 904)] == [(-1, "acme", 250), (None, "alice", None), (None, "acme", None), (None, None, None)]
    assert chat == [(3, "bob", 1.5)]


def test_a_ttft_deadline_in_the_body_is_counted_met_or_missed(served, client):
    before = served.metrics()
    client.completions.create(model=MODEL, prompt=[905, 1], max_tokens=2, extra_body={"ttft_slo_ms": 10**9})  # always met
    client.completions.create(model=MODEL, prompt=[906, 1], max_tokens=2)  # no deadline: not counted
    after = served.metrics()
    met, missed = ('framework_ttft_slo_requests_total{outcome="%s"}' % o for o in ("met", "missed"))
    assert (after[met] - before[met], after[missed] - before[missed]) == (1, 0)


def test_a_bad_scheduling_field_is_the_400s_param(raw):
    error = raw.post("/v1/completions", json={"model": MODEL, "prompt": "x", "ttft_slo_ms": -1}).json()["error"]
    assert error["param"] == "ttft_slo_ms"


def test_models_health_metrics(client, raw):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = raw.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    metrics = raw.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in METRIC_NAMES:
        assert f"\n{name}" in "\n" + metrics.text, name
    assert 'framework_requests_total{outcome="ok"}' in metrics.text
    assert 'framework_time_to_first_token_seconds_bucket{le="+Inf"}' in metrics.text
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.text)}  # valid exposition text
    assert families["framework_request_queue_time_seconds"] == "histogram"
    assert families["framework_scheduler_cpu_seconds"] == families["framework_engine_steps"] == "counter"
    assert families["framework_kv_cache_usage_ratio"] == "gauge"


def test_metrics_count_requests_and_tokens(served, client):
    before = served.metrics()
    client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=9, **GREEDY)
    after = served.metrics()
    assert after['framework_requests_total{outcome="ok"}'] == before['framework_requests_total{outcome="ok"}'] + 1
    assert after["framework_prompt_tokens_total"] == before["framework_prompt_tokens_total"] + 4
    assert after["framework_generation_tokens_total"] == before["framework_generation_tokens_total"] + 9
    assert after["framework_time_to_first_token_seconds_count"] == before["framework_time_to_first_token_seconds_count"] + 1
    assert after["framework_request_queue_time_seconds_count"] == before["framework_request_queue_time_seconds_count"] + 1
    assert after["framework_scheduler_passes_total"] >= before["framework_scheduler_passes_total"] + 9
    assert after["framework_scheduler_cpu_seconds_total"] > before["framework_scheduler_cpu_seconds_total"]
    assert after["framework_engine_steps_total"] >= before["framework_engine_steps_total"] + 9
    assert after["framework_requests_running"] == 0 and after["framework_requests_waiting"] == 0
    assert after["framework_kv_cache_usage_ratio"] == 0.0


# ---- many clients at once -----------------------------------------------------------------------


def test_concurrent_streaming_clients_are_batched(served, offline):
    # 64 clients at once, a third each: chat, text completion, token-id completion; all distinct.
    ids = token_prompts([4 + (7 * i) % 41 for i in range(64)], seed=2)
    kinds = ["chat", "text", "ids"]
    requests = []
    for i in range(64):
        kind = kinds[i % 3]
        if kind == "chat":
            requests.append((kind, [{"role": "user", "content": f"Question {i}: what comes next?"}]))
        elif kind == "text":
            requests.append((kind, f"Client {i} says: " + "la " * (i % 9)))
        else:
            requests.append((kind, ids[i]))
    offline_prompts = [offline.chat_prompt(p) if kind == "chat" else p for kind, p in requests]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].text for o in offline.generate(offline_prompts, params, use_tqdm=False)]
    assert len(set(want)) > 32  # distinct prompts, (mostly) distinct answers
    before = served.metrics()

    async def one(client, kind, prompt):
        if kind == "chat":
            stream = await client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=12, stream=True, **GREEDY)
        else:
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True, **GREEDY)
        pieces, finish = [], None
        async for chunk in stream:
            for choice in chunk.choices:
                pieces.append((choice.delta.content if kind == "chat" else choice.text) or "")
                finish = choice.finish_reason or finish
        return "".join(pieces), finish

    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60, http_client=openai.DefaultAsyncHttpxClient(trust_env=False)
        ) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, k, p) for k, p in requests)), timeout=60)

    results = asyncio.run(main())
    assert [text for text, _ in results] == want
    assert all(finish == "length" for _, finish in results)
    metrics = served.metrics()
    # The requests shared engine steps: one step computed many of them, and the 64 x 12 tokens
    # took far fewer steps than one request at a time would (~64 x 12).
    assert metrics["framework_requests_running_peak"] > max(8, before["framework_requests_running_peak"])
    assert metrics["framework_engine_steps_total"] - before["framework_engine_steps_total"] < 64 * 12 / 4
    assert metrics["framework_requests_running"] == 0
    assert metrics['framework_requests_total{outcome="ok"}'] == before['framework_requests_total{outcome="ok"}'] + 64
    assert served.llm.kv_cache_stats.num_used_blocks == 0


# ---- faults -------------------------------------------------------------------------------------

TOO_LONG = [7] * 2000  # the tiny model's max_position_embeddings is 1024

BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "unterminated', "JSON"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, "n must"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 2}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": TOO_LONG}, "maximum length"),
    ("/v1/completions", {"model": MODEL, "prompt": [TINY_VOCAB + 5]}, "token ids"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[5, 6], TOO_LONG]}, "maximum length"),
    ("/v1/chat/completions", b"not json at all", "JSON"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "top_logprobs": 99, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "priority": "1"}, "priority"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "tenant": ""}, "tenant must not be empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "ttft_slo_ms": 0}, "ttft_slo_ms must be"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "ttft_slo_ms": -5}, "milliseconds"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tenant": 3}, "tenant"),
]


@pytest.mark.parametrize("path, body, fragment", BAD_REQUESTS, ids=[f"{p.rsplit('/', 1)[1]}-{f}" for p, _, f in BAD_REQUESTS])
def test_bad_requests_get_openai_style_400(served, raw, client, offline, path, body, fragment):
    if isinstance(body, bytes):
        response = raw.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = raw.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment.lower() in error["message"].lower(), error
    assert error["type"] == "invalid_request_error"
    assert not served.llm.executor.active and served.llm.kv_cache_stats.num_used_blocks == 0
    assert_still_serving(client, offline)


def test_the_openai_client_sees_bad_request_errors(client, offline):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, temperature=-1)
    assert err.value.status_code == 400 and "temperature" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert err.value.body["param"] == "model"
    assert_still_serving(client, offline)


ABORTS = 'framework_requests_total{outcome="abort"}'


def eventually(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def wait_until_idle(llm) -> None:
    eventually(
        lambda: llm.kv_cache_stats.num_used_blocks == 0 and not llm.executor.active and not llm._groups,
        "the engine is idle and every KV block is back in the pool",
    )


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_that_drops_mid_stream_is_aborted(served, client, offline, path):
    llm = served.llm
    max_tokens = 900
    body = {"model": MODEL, "max_tokens": max_tokens, "stream": True, "temperature": 0, "ignore_eos": True}
    body |= {"prompt": "Tell me everything"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Talk."}]}
    steps_before, aborts_before = llm.executor.num_steps, served.metrics()[ABORTS]
    with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as h:
        with h.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = 0
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    events += 1
                if events == 3:
                    break
            assert llm.executor.active  # still generating when the client goes away
    wait_until_idle(llm)
    # aborted, not run to the end: far fewer steps than max_tokens
    assert llm.executor.num_steps - steps_before < max_tokens // 2
    eventually(lambda: served.metrics()[ABORTS] == aborts_before + 1, "the abort is counted")
    assert llm.kv_cache_stats.num_free_blocks == llm.kv_cache_stats.num_blocks
    assert_still_serving(client, offline)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_that_gives_up_on_a_non_streaming_request_is_aborted(served, client, offline, path):
    llm = served.llm
    max_tokens = 900
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body |= {"prompt": "Tell me everything"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Talk."}]}
    steps_before, aborts_before = llm.executor.num_steps, served.metrics()[ABORTS]
    with httpx.Client(base_url=served.url, timeout=httpx.Timeout(30, read=0.3), trust_env=False) as h:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            h.post(path, json=body)
    wait_until_idle(llm)
    assert llm.executor.num_steps - steps_before < max_tokens // 2
    eventually(lambda: served.metrics()[ABORTS] == aborts_before + 1, "the abort is counted")
    assert_still_serving(client, offline)


# ---- API key ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tiny_dir):
    server = RunningServer(new_llm(tiny_dir), api_key="secret")
    yield server
    server.stop()


def test_api_key_is_required_on_v1(secured, offline):
    with httpx.Client(base_url=secured.url, timeout=30, trust_env=False) as h:
        for path, method in [("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST")]:
            for headers in [{}, {"authorization": "Bearer wrong"}, {"authorization": "secret"}]:
                response = h.request(method, path, json={"model": MODEL, "prompt": "x"}, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["type"] == "authentication_error"
        assert h.get("/health").status_code == 200  # no key needed
        assert h.get("/metrics").status_code == 200
    with openai_client(secured.url, api_key="wrong") as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with openai_client(secured.url, api_key="secret") as good:
        assert [m.id for m in good.models.list().data] == [MODEL]
        out = good.completions.create(model=MODEL, prompt="Hello", max_tokens=5, **GREEDY)
        assert out.choices[0].text == expected(offline, "Hello", 5).text


# ---- python -m framework mode=serve -------------------------------------------------------------


def test_cli_serves_and_shuts_down_gracefully_on_sigterm(tiny_dir, tmp_path, offline):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")
    args = [
        f"model.path={tiny_dir}",
        "mode=serve",
        "kv_cache.max_tokens=2048",
        f"server.port={port}",
        "server.graceful_timeout=0.5",
        "model.dtype=float32",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "framework", *args],
        cwd=workdir,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    streamed: list[str] = []

    def long_stream():  # still running when SIGTERM arrives
        body = {"prompt": "Go on", "max_tokens": 1000, "stream": True, "temperature": 0, "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30, trust_env=False) as response:
                for line in response.iter_lines():
                    streamed.append(line)
        except httpx.HTTPError:  # the server cut the stream
            pass

    try:
        wait_for_health(url, lambda: proc.poll() is None, timeout=60)
        with openai_client(url) as c:
            (model,) = c.models.list().data
            assert model.id == Path(tiny_dir).name  # server.model_name defaults to the checkpoint folder's name
            out = c.completions.create(model=model.id, prompt="Hello", max_tokens=5, **GREEDY)
            assert out.choices[0].text == expected(offline, "Hello", 5).text
        reader = threading.Thread(target=long_stream, daemon=True)
        reader.start()
        eventually(lambda: len(streamed) >= 4, "the long stream has started")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        reader.join(timeout=10)
    finally:
        output = killed_and_read(proc, log)
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), output
    assert f"serving {Path(tiny_dir).name} on {url}/v1" in output
    assert not reader.is_alive()
    # the long request was cut off after graceful_timeout, not served to its end
    assert "data: [DONE]" not in streamed
    assert "Traceback" not in output, output
    assert list(workdir.iterdir()) == []
