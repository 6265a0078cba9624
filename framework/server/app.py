"""An OpenAI-compatible HTTP server over one LLM. Every HTTP request becomes engine requests on the
LLM's background executor loop, so concurrent clients are batched together (continuous batching).

`build_app` only wires routes to the functions below: the request gate (Host, API key, engine
health, body size), body parsing, starting engine requests, merging and counting their outputs,
and the response bodies and server-sent events made from them."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from framework.api import inputs
from framework.config import ServerConfig
from framework.outputs import RequestOutput
from framework.sampling_params import SamplingParams
from framework.server.metrics import ServerMetrics, Tally
from framework.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
OPEN_PATHS = ("/health", "/metrics")  # never behind the API key
DONE = "data: [DONE]\n\n"
Body = TypeVar("Body", bound=BaseModel)
logger = logging.getLogger(__name__)


# ---- errors -------------------------------------------------------------------------------------


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def error_response(message: str, status: int, kind: str, param: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def response_for(exc: OpenAIError) -> JSONResponse:
    return error_response(str(exc), exc.status, exc.kind, exc.param)


def http_error_kind(status: int) -> str:
    kinds = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
    return kinds.get(status, "invalid_request_error" if status < 500 else "internal_error")


def validation_error(exc: ValidationError) -> OpenAIError:
    errors = exc.errors(include_input=False, include_url=False)
    problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in errors)
    first = errors[0]["loc"] if errors else ()
    return OpenAIError(f"invalid request: {problems}", param=str(first[0]) if first else None)


def engine_error(llm) -> str | None:
    """Why the engine can no longer serve (its executor loop died for good); None while it can."""
    return getattr(llm, "engine_error", None)


def engine_failure(message: str) -> OpenAIError:
    return OpenAIError(f"the engine failed and cannot serve: {message}", 503, "engine_error")


# ---- the gate: checks made before a handler runs ------------------------------------------------


def host_name(host: str) -> str:
    """The name in a Host header, without its port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.split(":", 1)[0]


def host_allowed(host: str, allowed: tuple[str, ...] | None) -> bool:
    return allowed is None or "*" in allowed or host_name(host) in allowed


def key_matches(authorization: str, api_key: str) -> bool:
    return hmac.compare_digest(authorization.encode(), f"Bearer {api_key}".encode())


def refusal(scope, llm, api_key: str | None, hosts: tuple[str, ...] | None) -> JSONResponse | None:
    """The answer to a request refused on its headers alone, or None."""
    headers = Headers(scope=scope)
    if not host_allowed(headers.get("host", ""), hosts):
        return error_response("this server does not answer to that Host name (server.allowed_hosts)", 403, "permission_error")
    path = scope["path"]
    if api_key is not None and path not in OPEN_PATHS and not key_matches(headers.get("authorization", ""), api_key):
        return error_response("invalid or missing API key", 401, "authentication_error")
    if path.startswith("/v1/") and (error := engine_error(llm)):
        return response_for(engine_failure(error))
    return None


def too_large(limit: int) -> JSONResponse:
    return error_response(f"the request body exceeds the server's limit of {limit} bytes", 413, "invalid_request_error")


async def read_body(scope, receive, limit: int) -> bytes | JSONResponse | None:
    """The whole body, a 413 answer once it is known to exceed `limit` (by its Content-Length, or by
    counting a chunked body as it arrives), or None if the client went away."""
    declared = Headers(scope=scope).get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return too_large(limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return too_large(limit)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """`receive` for the app: the body already read, then the connection's own messages."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


class Gate:
    """ASGI middleware: refuses on the headers first (Host, API key, engine health), then reads the
    body within `max_body_bytes` before anything parses it."""

    def __init__(self, app, *, llm, api_key: str | None, hosts: tuple[str, ...] | None, max_body_bytes: int):
        self.app, self.llm, self.api_key, self.hosts, self.limit = app, llm, api_key, hosts, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        outcome = refusal(scope, self.llm, self.api_key, self.hosts) or await read_body(scope, receive, self.limit)
        if isinstance(outcome, bytes):
            await self.app(scope, replay(outcome, receive), send)
        elif outcome is not None:  # None: the client left while sending its body
            await outcome(scope, receive, send)


class Contain:
    """ASGI middleware: an unexpected exception becomes a logged 500 with no details, and the
    connection stays usable; one raised after the response started still ends that response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started or scope["type"] != "http":
                raise
            logger.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            await error_response("internal server error", 500, "internal_error")(scope, receive, send)


# ---- starting engine requests -------------------------------------------------------------------


async def parse(request: Request, model: type[Body]) -> Body:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise validation_error(exc) from None


def sampling_params_or_400(make) -> SamplingParams:
    try:
        return make()
    except ValueError as exc:
        raise OpenAIError(str(exc)) from None


def checked_scheduling(body) -> dict:
    """The body's scheduling metadata, checked as the Python API checks it (a 400 naming the field)."""
    metadata = body.scheduling()
    for name, value in metadata.items():
        try:
            inputs.scheduling(**{name: value})
        except (ValueError, TypeError) as exc:
            raise OpenAIError(str(exc), param=name) from None
    return metadata


def new_groups(llm, prompts, params: SamplingParams, scheduling: dict) -> list:
    """Tokenize and validate every prompt before any starts (a 400 means nothing ran)."""
    indices = range(len(prompts)) if len(prompts) > 1 else [None]
    try:
        return [llm.new_request_group(prompt, params, index=i, **scheduling) for i, prompt in zip(indices, prompts)]
    except (ValueError, TypeError) as exc:
        raise OpenAIError(str(exc), param="prompt") from None


def chat_prompt(llm, messages: list[ChatMessage]) -> list[int]:
    try:
        return llm.chat_prompt([m.as_template_input() for m in messages])
    except (ValueError, TypeError) as exc:  # the chat template rejected the conversation
        raise OpenAIError(str(exc), param="messages") from None


@dataclass
class ServedModel:
    """What the handlers serve from. Tokenization and chat templating run on `tokenizer_pool`, off
    the event loop, so a long prompt never stalls other clients or /health."""

    llm: object
    model_name: str
    metrics: ServerMetrics
    tokenizer_pool: ThreadPoolExecutor
    default_chat_max_tokens: int

    @asynccontextmanager
    async def lifespan(self, app):
        """The app's lifespan: the LLM's background loop runs while the app does; at its end running
        requests are aborted and the tokenizer pool stops."""
        self.llm.start()
        try:
            yield
        finally:
            self.llm.shutdown(abort_running=True)
            self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise OpenAIError(f"the model '{name}' does not exist; this server serves '{self.model_name}'", param="model")

    async def start(self, prompts, params: SamplingParams, scheduling: dict) -> tuple[list[AsyncIterator[RequestOutput]], Tally]:
        groups = await self.off_loop(new_groups, self.llm, prompts, params, scheduling)
        if error := engine_error(self.llm):  # it died while the prompts were tokenized
            raise engine_failure(error)
        streams = [self.llm.generate_group_async(g, stream=True) for g in groups]
        return streams, Tally(self.metrics, [len(g.requests[0].prompt_token_ids) for g in groups], scheduling["ttft_slo_ms"])


# ---- engine outputs -----------------------------------------------------------------------------


async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine requests as they arrive; cancelling this cancels (aborts) all, and
    so does a stream's exception, which is raised here."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, None))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out = await queue.get()
            if isinstance(out, Exception):
                raise out
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def recorded(streams, tally: Tally) -> AsyncIterator[tuple[int, RequestOutput]]:
    """`merged`, counting each request in the metrics when it finishes."""
    async with aclosing(merged(streams)) as outputs:
        async for i, out in outputs:
            tally.see(i, out)
            yield i, out


async def finals(streams, tally: Tally) -> list[RequestOutput]:
    last: dict[int, RequestOutput] = {}
    async with aclosing(recorded(streams, tally)) as outputs:
        async for i, out in outputs:
            last[i] = out
    return [last[i] for i in range(len(streams))]


async def unless_disconnected(request: Request, work):
    """Await `work`, but cancel it (which aborts its engine requests) if the client disconnects
    first: a non-streaming client that gives up must not keep its sequences running."""
    if await request.is_disconnected():  # gone while its prompt was prepared: never start it
        work.close()
        return error_response("the client disconnected", 499, "client_disconnected")
    task = asyncio.ensure_future(work)

    async def disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(watcher, task, return_exceptions=True)
    if task.cancelled():  # nobody is listening any more
        return error_response("the client disconnected", 499, "client_disconnected")
    return task.result()


async def finals_or_abort(request: Request, streams, tally: Tally):
    """The final outputs, or (the client went away) a response nobody will read; every request is
    counted either way."""
    try:
        return await unless_disconnected(request, finals(streams, tally))
    finally:
        tally.settle()


# ---- response bodies ----------------------------------------------------------------------------


def usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(choice, start: int = 0, offset: int = 0):
    if choice.logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, position in zip(choice.token_ids[start:], choice.logprobs[start:]):
        chosen = position[token_id]
        tokens.append(chosen.decoded_token)
        token_lps.append(chosen.logprob)
        tops.append({lp.decoded_token: lp.logprob for lp in position.values()})
        offsets.append(offset)
        offset += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def token_entry(lp) -> dict:
    return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list((lp.decoded_token or "").encode())}


def chat_logprobs(choice, k: int, start: int = 0):
    if choice.logprobs is None:
        return None
    content = []
    for token_id, position in zip(choice.token_ids[start:], choice.logprobs[start:]):
        top = sorted((lp for lp in position.values() if lp.rank <= k), key=lambda lp: lp.rank)
        content.append({**token_entry(position[token_id]), "top_logprobs": [token_entry(lp) for lp in top]})
    return {"content": content}


def completion_body(base: dict, outs: list[RequestOutput], n: int) -> dict:
    choices = [
        {"index": i * n + c.index, "text": c.text, "logprobs": completion_logprobs(c), "finish_reason": c.finish_reason}
        for i, out in enumerate(outs)
        for c in out.outputs
    ]
    return {**base, "choices": choices, "usage": usage(outs)}


def chat_body(base: dict, out: RequestOutput, k: int) -> dict:
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c, k),
            "finish_reason": c.finish_reason,
        }
        for c in out.outputs
    ]
    return {**base, "object": "chat.completion", "choices": choices, "usage": usage([out])}


# ---- server-sent events -------------------------------------------------------------------------


def sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def unsent(sent: dict, key, choice) -> tuple[int, int] | None:
    """The (chars, tokens) of `choice` already sent, now marked sent in full; None when it has
    nothing new (no new text and not finished). The one delta rule of both streaming endpoints."""
    chars, tokens = sent.get(key, (0, 0))
    if len(choice.text) == chars and choice.finish_reason is None:
        return None
    sent[key] = (len(choice.text), len(choice.token_ids))
    return chars, tokens


def completion_deltas(i: int, out: RequestOutput, n: int, sent: dict) -> list[dict]:
    deltas = []
    for c in out.outputs:
        if (seen := unsent(sent, (i, c.index), c)) is not None:
            chars, tokens = seen
            logprobs = completion_logprobs(c, tokens, chars)
            deltas.append({"index": i * n + c.index, "text": c.text[chars:], "logprobs": logprobs, "finish_reason": c.finish_reason})
    return deltas


def chat_deltas(out: RequestOutput, k: int, sent: dict) -> list[dict]:
    deltas = []
    for c in out.outputs:
        if (seen := unsent(sent, c.index, c)) is not None:
            chars, tokens = seen
            delta = {"content": c.text[chars:]} if len(c.text) > chars else {}
            deltas.append({"index": c.index, "delta": delta, "logprobs": chat_logprobs(c, k, tokens), "finish_reason": c.finish_reason})
    return deltas


async def events(streams, tally: Tally, base: dict, deltas, include_usage: bool) -> AsyncIterator[str]:
    """The streaming loop of both endpoints: an event for each choice with something new in each
    engine output (`deltas(i, out, sent)` makes them), then the usage event if asked, then [DONE]."""
    last: dict[int, RequestOutput] = {}
    sent: dict = {}
    async with aclosing(recorded(streams, tally)) as outputs:
        async for i, out in outputs:
            last[i] = out
            for choice in deltas(i, out, sent):
                yield sse({**base, "choices": [choice]})
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage([last[i] for i in sorted(last)])})
    yield DONE


def completion_events(streams, tally: Tally, base: dict, n: int, include_usage: bool) -> AsyncIterator[str]:
    return events(streams, tally, base, lambda i, out, sent: completion_deltas(i, out, n, sent), include_usage)


async def chat_events(stream, tally: Tally, base: dict, n: int, k: int, include_usage: bool) -> AsyncIterator[str]:
    chunk = {**base, "object": "chat.completion.chunk"}
    for i in range(n):
        role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield sse({**chunk, "choices": [role]})
    async with aclosing(events([stream], tally, chunk, lambda _, out, sent: chat_deltas(out, k, sent), include_usage)) as rest:
        async for event in rest:
            yield event


class EventStream(StreamingResponse):
    """Server-sent events whose engine requests are closed (aborted if unfinished) and counted
    however the response ends, even when the client left before the first event."""

    def __init__(self, events: AsyncIterator[str], tally: Tally):
        super().__init__(events, media_type="text/event-stream")
        self.tally = tally

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.tally.settle()


# ---- the endpoints ------------------------------------------------------------------------------


def health(llm) -> JSONResponse:
    error = engine_error(llm)
    return response_for(engine_failure(error)) if error else JSONResponse({"status": "ok"})


def exposition(metrics: ServerMetrics) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)


def models(model_name: str) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "framework"}]}


async def complete(served: ServedModel, request: Request):
    body = await parse(request, CompletionRequest)
    served.check_model(body.model)
    params = sampling_params_or_400(body.sampling_params)
    scheduling = checked_scheduling(body)
    prompts = body.prompts()
    if not prompts:
        raise OpenAIError("prompt must not be empty", param="prompt")
    streams, tally = await served.start(prompts, params, scheduling)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": served.model_name}
    if body.stream:
        return EventStream(completion_events(streams, tally, base, params.n, body.include_usage), tally)
    outs = await finals_or_abort(request, streams, tally)
    return outs if isinstance(outs, JSONResponse) else completion_body(base, outs, params.n)


async def chat(served: ServedModel, request: Request):
    body = await parse(request, ChatCompletionRequest)
    served.check_model(body.model)
    params = sampling_params_or_400(lambda: body.sampling_params(served.default_chat_max_tokens))
    scheduling = checked_scheduling(body)
    prompt = await served.off_loop(chat_prompt, served.llm, body.messages)
    (stream,), tally = await served.start([prompt], params, scheduling)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.model_name}
    k = params.logprobs or 0
    if body.stream:
        return EventStream(chat_events(stream, tally, base, params.n, k, body.include_usage), tally)
    outs = await finals_or_abort(request, [stream], tally)
    return outs if isinstance(outs, JSONResponse) else chat_body(base, outs[0], k)


# ---- the app ------------------------------------------------------------------------------------


def check_settings(api_key: str | None, max_body_bytes: int) -> None:
    if api_key is not None and not api_key:
        raise ValueError("server.api_key must not be empty: set a key, or leave it null to serve without one")
    if max_body_bytes < 1:
        raise ValueError(f"server.max_body_bytes must be >= 1, got {max_body_bytes}")


def accepted_hosts(allowed_hosts, api_key: str | None) -> tuple[str, ...] | None:
    """Host names to answer to; None: any. A keyless server defaults to loopback names, so that a
    web page cannot reach it through DNS rebinding."""
    if allowed_hosts is not None:
        return tuple(h.lower() for h in allowed_hosts)
    return None if api_key is not None else LOOPBACK_HOSTS


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(request, exc: OpenAIError):
        return response_for(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return error_response(str(exc.detail), exc.status_code, http_error_kind(exc.status_code), headers=exc.headers)


def build_app(
    llm,
    model_name: str,
    api_key: str | None = None,
    default_chat_max_tokens: int = 512,
    *,
    max_body_bytes: int = ServerConfig.max_body_bytes,
    allowed_hosts: list[str] | None = None,
    enable_docs: bool = False,
) -> FastAPI:
    check_settings(api_key, max_body_bytes)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="framework-tokenize")
    served = ServedModel(llm, model_name, ServerMetrics(llm), pool, default_chat_max_tokens)
    docs = {} if enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="framework", lifespan=served.lifespan, **docs)
    app.state.llm, app.state.metrics = llm, served.metrics
    app.add_middleware(Gate, llm=llm, api_key=api_key, hosts=accepted_hosts(allowed_hosts, api_key), max_body_bytes=max_body_bytes)
    app.add_middleware(Contain)  # outside Gate
    add_error_handlers(app)

    @app.get("/health")
    async def _health():
        return health(llm)

    @app.get("/v1/models")
    async def _models():
        return models(model_name)

    @app.get("/metrics")
    async def _metrics():
        return exposition(served.metrics)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(served, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat(served, request)

    return app


# ---- serving ------------------------------------------------------------------------------------


def stop_when_engine_dies(llm, server, stop: threading.Event, interval: float = 0.2) -> None:
    while not stop.wait(interval):
        if engine_error(llm):
            server.should_exit = True
            return


def serve(
    llm,
    host: str,
    port: int,
    model_name: str,
    api_key: str | None = None,
    graceful_timeout: float = 10.0,
    **settings,
) -> None:
    """Serve until SIGTERM or Ctrl-C; if the engine dies, stop and exit with status 1. `settings`:
    build_app's keyword-only ones."""
    import uvicorn

    app = build_app(llm, model_name, api_key, **settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_timeout)
    server = uvicorn.Server(config)
    stop = threading.Event()
    watcher = threading.Thread(target=stop_when_engine_dies, args=(llm, server, stop), name="framework-engine-watch", daemon=True)
    watcher.start()
    try:
        server.run()
    finally:
        stop.set()
        watcher.join()
    error = engine_error(llm)
    if error:
        print(f"framework: error: the engine failed: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1)
