"""The replay against an OpenAI-compatible server: each request is a streaming completion (prompt
token ids, `max_tokens`, `ignore_eos` as an extra field, usage in the last chunk), sent at its
arrival time on a thread of its own. Token times are the wall-clock arrivals of stream chunks that
carry text; the output token count is the server's `usage.completion_tokens`.

Only the standard library (http.client, threads): it measures any server that speaks the API
(this project's, vLLM's, llama.cpp's) without an HTTP client dependency.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from urllib.parse import urlsplit

from framework.replay.driver import ReplayResult, run_duration, timings_for
from framework.replay.statistics import RequestTiming
from framework.replay.workload import ReplayRequest


class Endpoint:
    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"replay.url must look like http://host:port (optionally ending in /v1); got {url!r}")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.base = parts.path.rstrip("/").removesuffix("/v1")
        key = os.environ.get("OPENAI_API_KEY")
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return kind(self.host, self.port)

    def first_model(self) -> str:
        connection = self.connect()
        try:
            connection.request("GET", f"{self.base}/v1/models", headers=self.headers)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise ValueError(f"GET {self.base}/v1/models answered {response.status}: {body[:200]!r}")
            models = json.loads(body)["data"]
            if not models:
                raise ValueError("the server lists no model; set replay.model")
            return models[0]["id"]
        finally:
            connection.close()


def completion_body(model: str, request: ReplayRequest) -> bytes:
    return json.dumps({
        "model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len, "ignore_eos": True,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
        **{key: value for key, value in (("tenant", request.tenant), ("priority", request.priority)) if value is not None},
    }).encode()


def stream_one(endpoint: Endpoint, model: str, request: ReplayRequest, timing: RequestTiming, origin: float) -> None:
    """Send one request and fill `timing` from its stream (times in seconds since `origin`)."""
    connection = endpoint.connect()
    try:
        connection.request("POST", f"{endpoint.base}/v1/completions", completion_body(model, request), endpoint.headers)
        response = connection.getresponse()
        if response.status != 200:
            timing.error = f"HTTP {response.status}: {response.read()[:300].decode(errors='replace')}"
            return
        usage = None
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:") :])
            if any(choice.get("text") for choice in chunk.get("choices", [])):
                timing.token_times.append(time.monotonic() - origin)
            usage = chunk.get("usage") or usage
        timing.finish = time.monotonic() - origin
        timing.output_tokens = usage["completion_tokens"] if usage else len(timing.token_times)
        if not timing.token_times:
            timing.error = "the stream carried no text"
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


def replay_url(url: str, model: str | None, requests: list[ReplayRequest], progress: bool = True) -> ReplayResult:
    """Send `requests` (in arrival order) to `url` at their arrival times, all streaming at once."""
    from tqdm.auto import tqdm

    endpoint = Endpoint(url)
    model = model or endpoint.first_model()
    timings = timings_for(requests)
    with tqdm(total=len(requests), desc="Replaying", unit="req", disable=not progress) as bar:
        lock = threading.Lock()

        def run(request: ReplayRequest, timing: RequestTiming) -> None:
            stream_one(endpoint, model, request, timing, origin)
            with lock:
                bar.update(1)

        threads = []
        origin = time.monotonic()
        for request, timing in zip(requests, timings):
            time.sleep(max(0.0, origin + request.arrival - time.monotonic()))
            thread = threading.Thread(target=run, args=(request, timing), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    return ReplayResult(timings, run_duration(timings, requests), [], None)
