"""Faults stay with their request: the server's gate (Host, API key, body size, engine health), strict
bodies, OpenAI-shaped errors for everything, aborts counted from the start, and exiting when the
engine dies. Each runs the real server on a loopback port; the lifted helpers are also tested alone."""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import contextmanager

import pytest

from framework.outputs import CompletionOutput, RequestOutput
from framework.server.app import build_app, chat_events, completion_deltas, completion_events, host_name, merged, recorded, serve
from framework.server.metrics import ServerMetrics, Tally
from tests.server.test_openai_server import (
    ABORTS,
    GREEDY,
    MESSAGES,
    MODEL,
    RunningServer,
    eventually,
    free_port,
    httpx,
    new_llm,
    openai_client,
    wait_for_health,
    wait_until_idle,
)

LIMIT = 64 * 1024
GREEDY_BODY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def hardened(tiny_dir):
    server = RunningServer(new_llm(tiny_dir), max_body_bytes=LIMIT)
    yield server
    server.stop()


@pytest.fixture
def raw(hardened):
    with httpx.Client(base_url=hardened.url, timeout=30, trust_env=False) as c:
        yield c


def assert_openai_error(response, status: int, kind: str | None = None, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert kind is None or error["type"] == kind, error
    assert fragment.lower() in error["message"].lower(), error
    return error


def post_json_text(raw, path: str, text: str):
    return raw.post(path, content=text.encode(), headers={"content-type": "application/json"})


@contextmanager
def gated(llm, attribute: str, gate: threading.Event):
    """Make `llm.<attribute>` wait for `gate` before doing its work (a slow tokenizer); yields an
    event set once a call is waiting."""
    original, entered = getattr(llm, attribute), threading.Event()

    def slow(*args, **kwargs):
        entered.set()
        assert gate.wait(30)
        return original(*args, **kwargs)

    setattr(llm, attribute, slow)
    try:
        yield entered
    finally:
        gate.set()
        delattr(llm, attribute)


@contextmanager
def dead_engine(llm, message: str):
    had = "engine_error" in vars(llm)
    previous = getattr(llm, "engine_error", None)
    llm.engine_error = message
    try:
        yield
    finally:
        if had:
            llm.engine_error = previous
        else:
            del llm.engine_error


# ---- the lifted helpers, alone ------------------------------------------------------------------


def output(request_id: str, text: str, tokens: list[int], finish=None) -> RequestOutput:
    choice = CompletionOutput(index=0, text=text, token_ids=tokens, finish_reason=finish)
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[1, 2, 3], outputs=[choice], finished=finish is not None)


async def fake_stream(outs, gate: asyncio.Event | None = None):
    for out in outs:
        yield out
    if gate is not None:
        await gate.wait()


def test_merged_streams_are_counted_once_each_even_when_abandoned():
    metrics = ServerMetrics()
    tally = Tally(metrics, [3, 3, 5])

    async def main():
        never = asyncio.Event()
        streams = [
            fake_stream([output("a", "x", [7]), output("a", "xy", [7, 8], "length")]),
            fake_stream([output("b", "z", [9])], never),  # stalls after one output
            fake_stream([], never),  # stalls before any output
        ]
        seen = []
        async for i, out in recorded(streams, tally):
            seen.append((i, out.outputs[0].text))
            if len(seen) == 3:
                break
        return seen

    seen = asyncio.run(main())
    assert sorted(seen) == [(0, "x"), (0, "xy"), (1, "z")]
    assert requests_by_outcome(metrics) == {"ok": 1, "error": 0, "abort": 0}
    tally.settle()
    tally.settle()  # idempotent
    assert requests_by_outcome(metrics) == {"ok": 1, "error": 0, "abort": 2}
    value = metrics.registry.get_sample_value
    assert value("framework_prompt_tokens_total") == 3 + 3 + 5 and value("framework_generation_tokens_total") == 2 + 1


def requests_by_outcome(metrics: ServerMetrics) -> dict[str, float]:
    return {k: metrics.registry.get_sample_value("framework_requests_total", {"outcome": k}) for k in ("ok", "error", "abort")}


def test_merged_cancels_its_streams_when_closed():
    closed = []

    async def stream(i):
        try:
            yield output(str(i), "a", [5])
            await asyncio.Event().wait()
        finally:
            closed.append(i)

    async def main():
        outputs = merged([stream(0), stream(1)])
        await outputs.__anext__()
        await outputs.aclose()

    asyncio.run(main())
    assert sorted(closed) == [0, 1]


def test_merged_raises_a_streams_exception_and_closes_the_others():
    closed = []

    async def waiting():
        try:
            yield output("w", "a", [5])
            await asyncio.Event().wait()
        finally:
            closed.append("waiting")

    async def failing():
        yield output("f", "b", [6])
        raise RuntimeError("the engine refused it")

    async def main():
        async for _ in merged([waiting(), failing()]):
            pass

    with pytest.raises(RuntimeError, match="refused"):
        asyncio.run(main())
    assert closed == ["waiting"]


def test_completion_deltas_send_only_what_is_new():
    sent: dict = {}
    assert [d["text"] for d in completion_deltas(1, output("r", "ab", [4, 5]), 2, sent)] == ["ab"]
    assert completion_deltas(1, output("r", "ab", [4, 5]), 2, sent) == []  # nothing new
    (last,) = completion_deltas(1, output("r", "abc", [4, 5, 6], "stop"), 2, sent)
    assert last == {"index": 2, "text": "c", "logprobs": None, "finish_reason": "stop"}


def test_completion_and_chat_streams_send_the_same_pieces_then_usage_and_done():
    outs = [output("r", "x", [7]), output("r", "x", [7, 8]), output("r", "xy", [7, 8, 9], "length")]

    def run(events):
        async def collect():
            return [e async for e in events(fake_stream(outs), Tally(ServerMetrics(), [3]))]

        return [e.removeprefix("data: ").strip() for e in asyncio.run(collect())]

    completion = run(lambda stream, tally: completion_events([stream], tally, {"id": "c"}, 1, True))
    chat = run(lambda stream, tally: chat_events(stream, tally, {"id": "c"}, 1, 0, True))
    assert [json.loads(e)["choices"][0]["text"] for e in completion[:2]] == ["x", "y"]  # "x" again: nothing new
    assert [json.loads(e)["choices"][0]["delta"] for e in chat[:3]] == [{"role": "assistant", "content": ""}, {"content": "x"}, {"content": "y"}]
    for events in (completion, chat):
        assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
        assert json.loads(events[-2])["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
        assert events[-1] == "[DONE]"


def test_host_name_strips_the_port():
    assert [host_name(h) for h in ["LocalHost:8000", "127.0.0.1", "[::1]:80", "[::1]", "a.b:1"]] == [
        "localhost",
        "127.0.0.1",
        "[::1]",
        "[::1]",
        "a.b",
    ]


# ---- body size, and tokenization off the event loop ---------------------------------------------


def test_body_over_the_limit_by_content_length_gets_413(hardened, raw):
    steps = hardened.llm.executor.num_steps
    body = json.dumps({"model": MODEL, "prompt": "x", "user": "u" * LIMIT})
    error = assert_openai_error(post_json_text(raw, "/v1/completions", body), 413, "invalid_request_error", str(LIMIT))
    assert error["param"] is None
    assert hardened.llm.executor.num_steps == steps
    assert raw.get("/health").status_code == 200


def test_chunked_body_over_the_limit_gets_413(raw):
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "user": "u" * (2 * LIMIT)}).encode()
    chunks = iter([body[i : i + 4096] for i in range(0, len(body), 4096)])  # no Content-Length: chunked
    response = raw.post("/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, "invalid_request_error", "limit")


@pytest.mark.parametrize("chunked", [False, True])
def test_body_under_the_limit_is_served(raw, chunked):
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 3, "user": "u" * (LIMIT - 200), **GREEDY_BODY}).encode()
    content = iter([body[:1000], body[1000:]]) if chunked else body
    response = raw.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_health_answers_while_a_prompt_is_being_tokenized(hardened, path):
    llm = hardened.llm
    attribute = "new_request_group" if path == "/v1/completions" else "chat_prompt"
    body = {"model": MODEL, "max_tokens": 4, **GREEDY_BODY}
    body |= {"prompt": "A long prompt"} if path == "/v1/completions" else {"messages": MESSAGES}
    gate, result = threading.Event(), {}

    def client():
        result["response"] = httpx.post(f"{hardened.url}{path}", json=body, timeout=30, trust_env=False)

    with gated(llm, attribute, gate) as entered:
        caller = threading.Thread(target=client)
        caller.start()
        assert entered.wait(10)
        for _ in range(3):
            health = httpx.get(f"{hardened.url}/health", timeout=5, trust_env=False)  # hangs if tokenizing blocks the loop
            assert health.status_code == 200
        assert caller.is_alive() and "response" not in result  # still waiting for its tokenizer
        gate.set()
        caller.join(timeout=30)
    assert result["response"].status_code == 200, result["response"].text
    assert result["response"].json()["usage"]["completion_tokens"] == 4


# ---- bodies that must be refused with 400 -------------------------------------------------------

SURROGATE = '"a\\ud800b"'
MESSAGE = '{"role": "user", "content": %s}'

RAW_400 = [
    ("/v1/completions", '{"prompt": %s}' % SURROGATE, "invalid json"),
    ("/v1/completions", '{"prompt": ["ok", %s]}' % SURROGATE, "invalid json"),
    ("/v1/completions", '{"prompt": "x", "model": %s}' % SURROGATE, "invalid json"),
    ("/v1/chat/completions", '{"messages": [%s]}' % (MESSAGE % SURROGATE), "invalid json"),
    ("/v1/chat/completions", '{"messages": [%s]}' % (MESSAGE % ('[{"type": "text", "text": %s}]' % SURROGATE)), "invalid json"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "top_p": Infinity}', "top_p"),
    ("/v1/chat/completions", '{"messages": [%s], "temperature": -Infinity}' % (MESSAGE % '"hi"'), "temperature"),
    ("/v1/completions", '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}", "invalid json"),
    ("/v1/completions", '{"prompt": "x", "user": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}", "invalid json"),
]


@pytest.mark.parametrize("path, text, fragment", RAW_400, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(RAW_400)])
def test_malformed_bodies_get_400(hardened, raw, path, text, fragment):
    assert_openai_error(post_json_text(raw, path, text), 400, "invalid_request_error", fragment)
    assert not hardened.llm.executor.active


def test_invalid_utf8_and_empty_bodies_get_400(raw):
    for body in [b'{"prompt": "\xff\xfe"}', b"", b"\x00\x01"]:
        response = raw.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert_openai_error(response, 400, "invalid_request_error", "invalid json")


STRICT_400 = [
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/v1/completions", {"prompt": [1.0, 2.0]}, "prompt"),
    ("/v1/completions", {"prompt": [[5, 6], [7.0]]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 1.0}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "seed": True}, "seed"),
    ("/v1/completions", {"prompt": "x", "top_k": 1.5}, "top_k"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [True]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stream": 1}, "stream"),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "stop": ""}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", ""]}, "stop"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": ""}, "stop"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0, "max_tokens": 5}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": 5, "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages.0"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": 1}, "logprobs"),
]


@pytest.mark.parametrize("path, body, fragment", STRICT_400, ids=[f"{i}-{f}" for i, (_, _, f) in enumerate(STRICT_400)])
def test_loosely_typed_or_empty_values_get_400(hardened, raw, path, body, fragment):
    steps = hardened.llm.executor.num_steps
    assert_openai_error(raw.post(path, json={"model": MODEL, **body}), 400, "invalid_request_error", fragment)
    assert hardened.llm.executor.num_steps == steps


def test_strict_bodies_still_take_what_openai_clients_send(hardened, raw):
    messages = [*MESSAGES, {"role": "assistant", "content": None}, {"role": "user", "content": [{"type": "text", "text": "Go"}]}]
    body = {"model": MODEL, "messages": messages, "max_completion_tokens": 3, "temperature": 1, "top_p": 1, "seed": 7}
    response = raw.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 3
    with openai_client(hardened.url) as client:
        out = client.completions.create(model=MODEL, prompt=[[5, 6, 7]], max_tokens=2, stop=["zzz"], **GREEDY)
        assert out.usage.completion_tokens == 2


# ---- every error is OpenAI-shaped ---------------------------------------------------------------


def test_unknown_paths_and_methods_are_openai_shaped(raw):
    assert_openai_error(raw.get("/nowhere"), 404, "not_found_error")
    assert_openai_error(raw.post("/v1/embeddings", json={}), 404, "not_found_error")
    response = raw.get("/v1/completions")
    assert_openai_error(response, 405)
    assert "POST" in response.headers["allow"]
    assert_openai_error(raw.post("/health"), 405)


def test_docs_are_off_by_default(raw):
    for path in ["/docs", "/redoc", "/openapi.json"]:
        assert_openai_error(raw.get(path), 404, "not_found_error")


def test_an_unexpected_exception_is_a_500_without_its_details(hardened, raw, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(hardened.llm, "new_request_group", broken)
    response = raw.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    error = assert_openai_error(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text and "RuntimeError" not in response.text
    assert error["param"] is None
    monkeypatch.undo()
    assert raw.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


# ---- Host names and the API key -----------------------------------------------------------------


def test_keyless_server_answers_only_loopback_host_names(raw):
    for host in ["localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:1", "[::1]:8000", "LOCALHOST"]:
        assert raw.get("/v1/models", headers={"host": host}).status_code == 200, host
    for host in ["evil.example", "evil.example:8000", "localhost.evil.example", "10.0.0.1", "[::2]"]:
        for path in ["/v1/models", "/health", "/metrics"]:
            assert_openai_error(raw.get(path, headers={"host": host}), 403, "permission_error", "host")
    response = raw.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, headers={"host": "rebound.example"})
    assert_openai_error(response, 403, "permission_error")


def test_an_empty_api_key_is_refused():
    with pytest.raises(ValueError, match="server.api_key"):
        build_app(None, MODEL, api_key="")
    with pytest.raises(ValueError, match="server.api_key"):
        serve(None, "127.0.0.1", free_port(), MODEL, api_key="")


@pytest.fixture(scope="module")
def keyed(tiny_dir):
    server = RunningServer(new_llm(tiny_dir), api_key="secret", enable_docs=True)
    yield server
    server.stop()


def test_keyed_server_accepts_any_host_and_keeps_docs_behind_the_key(keyed):
    key = {"authorization": "Bearer secret"}
    with httpx.Client(base_url=keyed.url, timeout=30, trust_env=False) as h:
        for path in ["/docs", "/redoc", "/openapi.json", "/nowhere"]:
            assert_openai_error(h.get(path), 401, "authentication_error")
        assert h.get("/openapi.json", headers=key).json()["info"]["title"] == "framework"
        assert h.get("/docs", headers=key).status_code == 200
        assert_openai_error(h.get("/nowhere", headers=key), 404, "not_found_error")
        assert h.get("/v1/models", headers={**key, "host": "api.example.com"}).status_code == 200
        assert h.get("/health", headers={"host": "api.example.com"}).status_code == 200


# ---- aborts before the first token --------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_before_its_first_token_is_counted_as_aborted(hardened, stream):
    llm = hardened.llm
    before = hardened.metrics()
    body = {"model": MODEL, "prompt": [5, 6, 7, 8, 9], "max_tokens": 50, "stream": stream, **GREEDY_BODY}
    gate = threading.Event()
    with gated(llm, "new_request_group", gate):
        with httpx.Client(base_url=hardened.url, timeout=httpx.Timeout(30, read=0.5), trust_env=False) as h:
            with pytest.raises(httpx.ReadTimeout):  # gives up while its prompt is still being prepared
                h.post("/v1/completions", json=body)
        gate.set()
        eventually(lambda: hardened.metrics()[ABORTS] == before[ABORTS] + 1, "the abort is counted")
    wait_until_idle(llm)
    after = hardened.metrics()
    assert after["framework_prompt_tokens_total"] == before["framework_prompt_tokens_total"] + 5
    assert after['framework_requests_total{outcome="ok"}'] == before['framework_requests_total{outcome="ok"}']


# ---- the engine's health ------------------------------------------------------------------------


def test_a_dead_engine_makes_health_and_v1_answer_503(hardened, raw):
    with dead_engine(hardened.llm, "the executor loop crashed: boom"):
        assert_openai_error(raw.get("/health"), 503, "engine_error", "boom")
        assert_openai_error(raw.get("/v1/models"), 503, "engine_error", "boom")
        assert_openai_error(raw.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 503, "engine_error")
        assert_openai_error(raw.post("/v1/chat/completions", json={"messages": MESSAGES}), 503, "engine_error")
        assert raw.get("/metrics").status_code == 200
    assert raw.get("/health").json() == {"status": "ok"}
    assert raw.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_an_engine_that_dies_while_a_prompt_is_tokenized_gives_503(hardened):
    gate, result = threading.Event(), {}
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}

    def client():
        result["response"] = httpx.post(f"{hardened.url}/v1/completions", json=body, timeout=30, trust_env=False)

    with gated(hardened.llm, "new_request_group", gate) as entered:
        caller = threading.Thread(target=client)
        caller.start()
        assert entered.wait(10)
        with dead_engine(hardened.llm, "died mid-request"):
            gate.set()
            caller.join(timeout=30)
    assert_openai_error(result["response"], 503, "engine_error", "died mid-request")
    wait_until_idle(hardened.llm)


def test_serve_exits_with_status_1_when_the_engine_dies(tiny_dir, capsys):
    llm = new_llm(tiny_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ended = {}

    def run():
        try:
            serve(llm, "127.0.0.1", port, MODEL, allowed_hosts=["api.internal", "127.0.0.1"])
            ended["code"] = 0
        except SystemExit as exc:
            ended["code"] = exc.code

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for_health(url, thread.is_alive, timeout=30)
        assert httpx.get(f"{url}/v1/models", headers={"host": "api.internal:8000"}, trust_env=False).status_code == 200
        assert_openai_error(httpx.get(f"{url}/v1/models", headers={"host": "localhost"}, trust_env=False), 403)
        llm.engine_error = "the executor loop crashed: boom"
        thread.join(timeout=20)
    finally:
        if thread.is_alive():
            llm.engine_error = "stop"
            thread.join(timeout=20)
    assert not thread.is_alive()
    assert ended == {"code": 1}
    assert "boom" in capsys.readouterr().err
    assert llm._thread is None  # the lifespan shut the executor loop down
