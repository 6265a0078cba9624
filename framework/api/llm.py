"""The user-facing entry point: tokenizer, detokenizer and an executor built from the config.

The executor runs inline (offline `generate`, `stream`) or on a background thread (`start()`,
implied by `generate_async`), in which case every caller's requests are batched by that one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Sequence

from framework.api import inputs
from framework.api.detokenizer import IncrementalDetokenizer, visible_text
from framework.api.options import options_to_overrides
from framework.config import check_overrides, compose
from framework.outputs import CompletionOutput, Logprob, RequestOutput
from framework.plugins.manager import Plugins, create_plugin_manager
from framework.request import LlmRequest
from framework.sampling_params import SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


@dataclass(eq=False)
class RequestGroup:
    """One prompt's `n` completions, reported together under one request id."""

    request_id: str
    requests: list[LlmRequest]
    listener: Callable[[RequestOutput], None] | None = None
    logprob_cache: dict | None = None

    @property
    def finished(self) -> bool:
        return all(r.is_finished for r in self.requests)


class LLM:
    """`LLM()` loads the default model (SmolLM2-135M-Instruct); `LLM(model=folder)` any Llama-family
    Hugging Face checkpoint. Keyword options are config overrides (see `options_to_overrides`)."""

    def __init__(self, model: str | None = None, *, config=None, plugins: Plugins | None = None, **options):
        from framework.executor.builder import build_executor
        from framework.models.checkpoint import resolve_checkpoint

        self.plugins = plugins or create_plugin_manager()
        if config is not None and (model is not None or options):
            raise TypeError("pass either a composed config or model/options, not both")
        if config is None:
            overrides = options_to_overrides(model, options)
            check_overrides(overrides, self.plugins)
            config = compose(overrides, self.plugins)
        self.config = config
        checkpoint_dir = resolve_checkpoint(self.config.model.path)
        self.tokenizer = _load_tokenizer(checkpoint_dir)
        self.executor = build_executor(self.config, self.plugins, checkpoint_dir, IncrementalDetokenizer(self.tokenizer))
        self.eos_token_ids = _eos_token_ids(self.executor.model_engine, self.tokenizer)
        self._ids = itertools.count()
        self._groups: dict[str, RequestGroup] = {}  # by member request id, while running
        self._lock = threading.Lock()  # guards _groups and engine_error
        self._step_lock = threading.Lock()  # one step (and its dispatch to listeners) at a time
        self._thread: threading.Thread | None = None
        self.engine_error: str | None = None  # set once no more requests are served (the loop died, or close()): why
        self._wake = threading.Event()
        self._stopping = False
        self._stepped: list[RequestOutput] = []  # outputs of add_request's groups, until step() returns them

    # ---- adding requests ---------------------------------------------------------------------
    def new_request_group(
        self, prompt: Prompt, params: SamplingParams | None, priority=None, request_id=None, index=None, *, tenant=None, ttft_slo_ms=None,
        arrival_time=None,
    ) -> RequestGroup:
        """Build and validate (ValueError or TypeError naming the problem) the requests of one
        prompt; `priority`, `tenant` and `ttft_slo_ms` are its scheduling metadata (None: unset),
        `arrival_time` when it counts as arrived (on `clock`; None: now)."""
        (params,) = inputs.sampling_params_list(params, 1)
        metadata = inputs.scheduling(priority, tenant, ttft_slo_ms)
        text, ids = inputs.token_prompt(prompt, index)
        if text is not None:
            ids = self.tokenizer.encode(text)
        group_id = str(request_id) if request_id is not None else str(next(self._ids))
        arrival_time = self.clock.now() if arrival_time is None else arrival_time
        requests = []
        for i in range(params.n):
            member = params if params.n == 1 or params.seed is None else dataclasses.replace(params, seed=(params.seed + i) % 2**64)
            requests.append(
                LlmRequest(
                    request_id=group_id if params.n == 1 else f"{group_id}-{i}",
                    prompt_token_ids=ids,
                    sampling_params=member,
                    prompt=text,
                    **metadata,
                    eos_token_ids=self.eos_token_ids,
                    follows=requests[0] if requests else None,
                    arrival_time=arrival_time,
                )
            )
        error = self.executor.validate(requests[0])
        if error:
            raise ValueError(f"{'prompt' if index is None else f'prompts[{index}]'}: {error}")
        return RequestGroup(group_id, requests)

    def _submit(self, groups: list[RequestGroup]) -> None:
        with self._lock:
            if self.engine_error is not None:
                raise RuntimeError(f"the engine has stopped and serves no more requests: {self.engine_error}")
            for group in groups:
                for request in group.requests:
                    if request.request_id in self._groups:
                        raise ValueError(f"request id {request.request_id!r} is already running")
            for group in groups:
                for request in group.requests:
                    self._groups[request.request_id] = group
        for group in groups:
            for request in group.requests:
                self.executor.enqueue(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a running request (all its completions); its KV blocks return to the pool at once."""
        with self._lock:
            members = [r.request_id for r in next((g.requests for g in self._groups.values() if g.request_id == request_id), [])]
        for member in members:
            self.executor.abort(member)
        self._wake.set()

    # ---- stepping ----------------------------------------------------------------------------
    def _step(self) -> None:
        """One executor step (the caller holds `_step_lock`); each changed group's listener gets
        its new output, and finished groups are forgotten."""
        changed: dict[int, RequestGroup] = {}
        for request in self.executor.step():
            with self._lock:
                group = self._groups.get(request.request_id)
            if group is not None:
                changed[id(group)] = group
        with self._lock:
            for group in changed.values():
                if group.finished:
                    for request in group.requests:
                        self._groups.pop(request.request_id, None)
        for group in changed.values():
            self._notify(group)

    def _notify(self, group: RequestGroup) -> None:
        """Hand the group's output to its listener; a listener that raises (say, its event loop
        has closed) loses its requests, never the loop."""
        if group.listener is None:
            return
        try:
            group.listener(self._output(group))
        except Exception:
            logger.exception("delivering the output of request %s failed; aborting it", group.request_id)
            group.listener = None
            self.abort(group.request_id)

    def _updates(self, groups: list[RequestGroup]) -> Iterator[RequestOutput]:
        """Outputs of `groups` as they change, until all have finished. Without the background
        loop the caller steps the executor itself (callers on several threads share the steps).
        Leaving early, by an exception or by closing the iterator, aborts what is unfinished."""
        inbox: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        for group in groups:
            group.listener = inbox.put
        pending = {g.request_id for g in groups}
        self._submit(groups)
        try:
            while pending:
                out = self._next_output(inbox)
                if out.finished:
                    pending.discard(out.request_id)
                yield out
        finally:
            for request_id in pending:
                self.abort(request_id)

    def _next_output(self, inbox: queue.SimpleQueue) -> RequestOutput:
        while True:
            if self._thread is not None:
                try:
                    return inbox.get(timeout=0.1)
                except queue.Empty:
                    continue
            try:
                return inbox.get_nowait()
            except queue.Empty:
                pass
            with self._step_lock:
                if inbox.empty():
                    if not self.executor.has_work():
                        raise RuntimeError("the engine went idle with requests of this call unfinished")
                    self._step()

    # ---- stepping by hand (a driver that owns the clock, like the replay benchmark) -------------
    @property
    def clock(self):
        """The engine's clock: request times are stamped in it (a wall clock, or a simulated
        engine's virtual one)."""
        return self.executor.model_engine.clock

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams,
        *,
        request_id=None,
        arrival_time: float | None = None,
        priority: int | None = None,
        tenant: str | None = None,
        ttft_slo_ms: float | None = None,
    ) -> str:
        """Queue one prompt for `step()`; returns its request id. `arrival_time` (on `clock`,
        default now) is when it counts as having arrived; the scheduling metadata are `generate`'s.
        Raises ValueError for a bad request."""
        self._check_stepped_by_hand()
        group = self.new_request_group(
            prompt, sampling_params, priority, request_id=request_id, tenant=tenant, ttft_slo_ms=ttft_slo_ms, arrival_time=arrival_time
        )
        group.listener = self._stepped.append
        self._submit([group])
        return group.request_id

    def _check_stepped_by_hand(self) -> None:
        if self._thread is not None:
            raise RuntimeError("add_request/step drive the engine by hand; the background loop is running")

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the outputs of the `add_request` prompts it changed (tokens
        so far, `finished` on the last one)."""
        self._check_stepped_by_hand()
        with self._step_lock:
            self._step()
        outputs = list(self._stepped)
        self._stepped.clear()  # in place: the listeners hold its `append`
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.executor.has_work()

    # ---- the background loop (serving) -------------------------------------------------------
    def start(self) -> None:
        """Run the executor on a background thread; requests from any thread are batched by it."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="framework-executor", daemon=True)
        self._thread.start()

    def shutdown(self, abort_running: bool = False, timeout: float = 10.0) -> None:
        """Stop the background loop. With `abort_running`, running requests are aborted first and
        their callers receive their final (aborted) outputs."""
        import time

        if self._thread is not None and abort_running:
            with self._lock:
                group_ids = {g.request_id for g in self._groups.values()}
            for group_id in group_ids:
                self.abort(group_id)
            deadline = time.monotonic() + timeout
            while self.executor.has_work() and time.monotonic() < deadline and self._thread.is_alive():
                time.sleep(0.01)
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join()

    def close(self) -> None:
        """Stop the background loop (aborting what runs) and release the model engine (a
        tensor-parallel engine's rank processes end); later requests raise. Called again, it does
        nothing. `with LLM(...) as llm:` closes it on leaving the block."""
        self.shutdown(abort_running=True)
        with self._step_lock:  # (no step of another caller's `generate` runs on a closed engine)
            if self.engine_error is None:
                self._die("the LLM is closed")
            self.executor.model_engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self.executor.has_work():
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
                    continue
                with self._step_lock:
                    self._step()
        except Exception as exc:  # the executor itself broke: say so, fail everyone, stop
            logger.exception("the executor loop died")
            self._die(f"the executor loop died: {exc!r}")

    def _die(self, reason: str) -> None:
        """Refuse new requests from now on and finish every request in flight with an error."""
        with self._lock:
            self.engine_error = reason
            groups = {id(g): g for g in self._groups.values()}
            self._groups.clear()
        self.executor.fail_all(reason)
        for group in groups.values():
            self._notify(group)

    # ---- outputs -----------------------------------------------------------------------------
    def _logprobs(self, raw: list[dict] | None, cache: list) -> list[dict[int, Logprob]] | None:
        if raw is None:
            return None
        for position in raw[len(cache) :]:
            cache.append(
                None
                if position is None
                else {t: Logprob(lp, rank, self.tokenizer.decode([t])) for t, (lp, rank) in position.items()}
            )
        return list(cache)

    def _output(self, group: RequestGroup) -> RequestOutput:
        if group.logprob_cache is None:
            group.logprob_cache = {"prompt": [], **{i: [] for i in range(len(group.requests))}}
        outputs = []
        for i, request in enumerate(group.requests):
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=visible_text(request),
                    token_ids=list(request.output_token_ids),
                    logprobs=self._logprobs(request.logprobs, group.logprob_cache[i]),
                    finish_reason=request.finish_reason.value if request.finish_reason else None,
                    stop_reason=request.stop_reason,
                )
            )
        first = group.requests[0]
        metrics = {"arrival_time": first.arrival_time, "num_preemptions": sum(r.num_preemptions for r in group.requests)}
        for stamp in ("first_scheduled_time", "first_token_time"):
            stamps = [getattr(r, stamp) for r in group.requests if getattr(r, stamp) is not None]
            if stamps:
                metrics[stamp] = min(stamps)
        if group.finished:
            metrics["finish_time"] = max(r.finish_time for r in group.requests)
        errors = [r.error for r in group.requests if r.error]
        return RequestOutput(
            request_id=group.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=outputs,
            finished=group.finished,
            prompt_logprobs=self._logprobs(first.prompt_logprobs, group.logprob_cache["prompt"]),
            error=errors[0] if errors else None,
            metrics=metrics,
        )

    # ---- the public API ----------------------------------------------------------------------
    def _groups_for(self, prompts, sampling_params, priority=None, tenant=None, ttft_slo_ms=None) -> list[RequestGroup]:
        prompts = inputs.prompts_list(prompts)
        n = len(prompts)
        params = inputs.sampling_params_list(sampling_params, n)
        metadata = zip(inputs.priorities_list(priority, n), inputs.tenants_list(tenant, n), inputs.ttft_slos_list(ttft_slo_ms, n))
        return [
            self.new_request_group(p, sp, pr, index=i, tenant=t, ttft_slo_ms=slo)
            for i, (p, sp, (pr, t, slo)) in enumerate(zip(prompts, params, metadata))
        ]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        *,
        tenant: Sequence[str] | None = None,
        ttft_slo_ms: Sequence[float] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt (text or token ids) or a list of them. Every prompt is checked
        before any runs: a bad one raises ValueError and leaves the engine as it was.

        Scheduling metadata, one entry per prompt, read by the scheduling policies
        (docs/scheduler.md): `priority` (ints, lower is more important), `tenant` (strs: who asks;
        `fair` shares the engine per tenant), `ttft_slo_ms` (the first token is wanted within this
        many milliseconds)."""
        from tqdm.auto import tqdm

        groups = self._groups_for(prompts, sampling_params, priority, tenant, ttft_slo_ms)
        finals: dict[str, RequestOutput] = {}
        with tqdm(total=len(groups), desc="Generating", disable=not use_tqdm or len(groups) < 2) as bar:
            with contextlib.closing(self._updates(groups)) as updates:  # aborts what is left on Ctrl-C
                for out in updates:
                    if out.finished:
                        finals[out.request_id] = out
                        bar.update(1)
        return [finals[g.request_id] for g in groups]

    def stream(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        priority: int | None = None,
        *,
        tenant: str | None = None,
        ttft_slo_ms: float | None = None,
    ) -> Iterator[RequestOutput]:
        """Partial outputs of one prompt as tokens arrive (text is cumulative); the last has
        `finished=True`. Closing the iterator early aborts the request. The scheduling metadata
        are `generate`'s, for this one prompt."""
        group = self.new_request_group(prompt, sampling_params, priority, tenant=tenant, ttft_slo_ms=ttft_slo_ms)
        yield from self._updates([group])

    async def generate_async(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        *,
        stream: bool = False,
        request_id: str | None = None,
        priority: int | None = None,
        tenant: str | None = None,
        ttft_slo_ms: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """`async for out in llm.generate_async(prompt, params, stream=True)`: partial outputs
        (or only the final one), while the background loop batches all concurrent callers. A
        consumer that stops iterating aborts its request. The scheduling metadata are
        `generate`'s, for this one prompt."""
        group = self.new_request_group(
            prompt, sampling_params or SamplingParams(), priority, request_id=request_id, tenant=tenant, ttft_slo_ms=ttft_slo_ms
        )
        async for out in self.generate_group_async(group, stream=stream):
            yield out

    async def generate_group_async(self, group: RequestGroup, stream: bool = False) -> AsyncIterator[RequestOutput]:
        """Run an already validated request group (see `new_request_group`) on the background loop."""
        self.start()
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[RequestOutput] = asyncio.Queue()
        group.listener = lambda out: loop.call_soon_threadsafe(inbox.put_nowait, out)
        self._submit([group])
        finished = False
        try:
            while not finished:
                out = await inbox.get()
                finished = out.finished
                if stream or finished:
                    yield out
        finally:
            if not finished:
                self.abort(group.request_id)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = False) -> RequestOutput:
        """One conversation (a list of {"role", "content"} dicts) through the checkpoint's chat template."""
        return self.generate([self.chat_prompt(messages)], sampling_params, use_tqdm=use_tqdm)[0]

    def chat_prompt(self, messages) -> list[int]:
        """The conversation's token ids, through the checkpoint's chat template."""
        messages = inputs.chat_messages(messages)
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # the template's own rules (say, roles that must alternate)
            raise ValueError(f"messages: the chat template rejected the conversation: {exc}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix no running request holds; returns how many blocks it freed."""
        return self.executor.reset_prefix_cache()

    @property
    def speculation_stats(self):
        """Draft tokens verified and accepted so far (all zero without a drafter)."""
        from framework.drafter.base import SpeculationStats

        return SpeculationStats.of(self.executor.counters, self.executor.num_steps)

    @property
    def kv_cache_stats(self):
        return self.executor.kv_cache_manager.stats()


def _load_tokenizer(checkpoint_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_dir))


def _eos_token_ids(engine, tokenizer) -> tuple[int, ...]:
    ids = set()
    configured = getattr(getattr(engine, "hf_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return tuple(sorted(ids))
