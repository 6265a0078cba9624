"""An OpenAI-compatible HTTP server over one LLM. Every HTTP request becomes engine requests on the
LLM's background executor loop, so concurrent clients are batched together (continuous batching)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from framework.outputs import RequestOutput
from framework.server.metrics import ServerMetrics
from framework.server.protocol import ChatCompletionRequest, CompletionRequest


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def _error(message: str, status: int, kind: str, param=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def build_app(llm, model_name: str, api_key: str | None = None, default_chat_max_tokens: int = 512) -> FastAPI:
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app):
        llm.start()
        try:
            yield
        finally:
            llm.shutdown(abort_running=True)

    app = FastAPI(title="framework", lifespan=lifespan)
    app.state.llm, app.state.metrics = llm, metrics

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, exc: OpenAIError):
        return _error(str(exc), exc.status, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in exc.errors()
        )
        return _error(f"invalid request: {problems}", 400, "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
                return _error("invalid or missing API key", 401, "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(llm), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "framework"}]}

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise OpenAIError(f"the model '{name}' does not exist; this server serves '{model_name}'", param="model")

    def params_or_400(make):
        try:
            return make()
        except ValueError as exc:
            raise OpenAIError(str(exc)) from None

    def start(prompt, params) -> AsyncIterator[RequestOutput]:
        """Validate now (a 400 before any response starts), then stream from the engine."""
        try:
            group = llm.new_request_group(prompt, params, None)
        except ValueError as exc:
            raise OpenAIError(str(exc).removeprefix("prompt 0: ")) from None
        return llm.generate_group_async(group, stream=True)

    async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several engine requests as they arrive; cancelling this cancels (aborts) all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for out in stream:
                    await queue.put((i, out))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out = await queue.get()
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def recorded(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
        """`merged`, counting each request in the metrics when it finishes, or as aborted when it
        is abandoned unfinished (the client went away)."""
        last: dict[int, RequestOutput] = {}
        done: set[int] = set()
        try:
            async with aclosing(merged(streams)) as outputs:
                async for i, out in outputs:
                    last[i] = out
                    if out.finished:
                        done.add(i)
                        metrics.record(out)
                    yield i, out
        finally:
            for i, out in last.items():
                if i not in done:
                    metrics.record(out, aborted=True)

    async def finals(streams) -> list[RequestOutput]:
        last: dict[int, RequestOutput] = {}
        async with aclosing(recorded(streams)) as outputs:
            async for i, out in outputs:
                last[i] = out
        return [last[i] for i in range(len(streams))]

    async def unless_disconnected(request: Request, work):
        """Await `work`, but cancel it (which aborts its engine requests) if the client disconnects
        first: a non-streaming client that gives up must not keep its sequences running."""
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
            return _error("the client disconnected", 499, "client_disconnected")
        return task.result()

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
            tops.append({lp.decoded_token: lp.logprob for t, lp in position.items()})
            offsets.append(offset)
            offset += len(chosen.decoded_token or "")
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(choice, k: int, start: int = 0):
        if choice.logprobs is None:
            return None
        content = []
        for token_id, position in zip(choice.token_ids[start:], choice.logprobs[start:]):
            chosen = position[token_id]
            top = sorted((lp for lp in position.values() if lp.rank <= k), key=lambda lp: lp.rank)
            content.append(
                {
                    "token": chosen.decoded_token,
                    "logprob": chosen.logprob,
                    "bytes": list((chosen.decoded_token or "").encode()),
                    "top_logprobs": [
                        {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list((lp.decoded_token or "").encode())}
                        for lp in top
                    ],
                }
            )
        return {"content": content}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params = params_or_400(body.sampling_params)
        prompts = body.prompts()
        if not prompts:
            raise OpenAIError("prompt must not be empty", param="prompt")
        streams = [start(p, params) for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        n = params.n
        if not body.stream:
            outs = await unless_disconnected(request, finals(streams))
            if not isinstance(outs, list):
                return outs
            choices = [
                {
                    "index": i * n + c.index,
                    "text": c.text,
                    "logprobs": completion_logprobs(c),
                    "finish_reason": c.finish_reason,
                }
                for i, out in enumerate(outs)
                for c in out.outputs
            ]
            return {**base, "choices": choices, "usage": usage(outs)}

        async def events():
            sent = {}  # (prompt, choice) -> (chars, tokens) already sent
            last: dict[int, RequestOutput] = {}
            async with aclosing(recorded(streams)) as outputs:
                async for i, out in outputs:
                    last[i] = out
                    for c in out.outputs:
                        chars, tokens = sent.get((i, c.index), (0, 0))
                        if len(c.text) == chars and c.finish_reason is None:
                            continue
                        sent[(i, c.index)] = (len(c.text), len(c.token_ids))
                        choice = {
                            "index": i * n + c.index,
                            "text": c.text[chars:],
                            "logprobs": completion_logprobs(c, tokens, chars),
                            "finish_reason": c.finish_reason,
                        }
                        yield _sse({**base, "choices": [choice]})
            if body.include_usage:
                yield _sse({**base, "choices": [], "usage": usage([last[i] for i in sorted(last)])})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        params = params_or_400(lambda: body.sampling_params(default_chat_max_tokens))
        try:
            prompt = llm.chat_prompt([m.as_template_input() for m in body.messages])
        except Exception as exc:  # the template rejected the conversation
            raise OpenAIError(f"messages: {exc}", param="messages") from None
        stream = start(prompt, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": model_name}
        if not body.stream:
            outs = await unless_disconnected(request, finals([stream]))
            if not isinstance(outs, list):
                return outs
            (out,) = outs
            choices = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, params.logprobs or 0),
                    "finish_reason": c.finish_reason,
                }
                for c in out.outputs
            ]
            return {**base, "object": "chat.completion", "choices": choices, "usage": usage([out])}

        async def events():
            base_chunk = {**base, "object": "chat.completion.chunk"}
            sent: dict[int, tuple[int, int]] = {}
            final = None
            for i in range(params.n):
                yield _sse({**base_chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
            async with aclosing(recorded([stream])) as outputs:
                async for _, out in outputs:
                    final = out
                    for c in out.outputs:
                        chars, tokens = sent.get(c.index, (0, 0))
                        if len(c.text) == chars and c.finish_reason is None:
                            continue
                        sent[c.index] = (len(c.text), len(c.token_ids))
                        delta = {"content": c.text[chars:]} if len(c.text) > chars else {}
                        choice = {"index": c.index, "delta": delta, "logprobs": chat_logprobs(c, params.logprobs or 0, tokens), "finish_reason": c.finish_reason}
                        yield _sse({**base_chunk, "choices": [choice]})
            if body.include_usage and final is not None:
                yield _sse({**base_chunk, "choices": [], "usage": usage([final])})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(llm, host: str, port: int, model_name: str, api_key: str | None = None, graceful_timeout: float = 10.0) -> None:
    import uvicorn

    app = build_app(llm, model_name, api_key)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_timeout)
