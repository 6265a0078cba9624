"""The step loop."""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from framework.decoder.base import Decoder
from framework.engine.base import ModelEngine
from framework.executor.faults import ComponentFault, FaultIsolation
from framework.executor.verify import decode_runs
from framework.request import FinishReason, LlmRequest, RequestState
from framework.resources.base import ResourceManager
from framework.sampling_params import plain_ints_within, short_repr
from framework.scheduler.base import CapacityScheduler, MicroBatchScheduler, is_decoding

logger = logging.getLogger(__name__)


@dataclass
class StepCounters:
    """Running totals over all steps, for benchmarks and metrics."""

    step_seconds: float = 0.0  # whole steps that ran a forward
    forward_seconds: float = 0.0  # inside model_engine.forward
    tokens_forwarded: int = 0
    tokens_sampled: int = 0
    attended_positions: int = 0  # sum over forwarded tokens of the context each attends to
    verify_steps: int = 0  # request-steps that verified drafts
    draft_tokens: int = 0  # drafts verified
    accepted_draft_tokens: int = 0  # of which accepted
    scheduler_cpu_seconds: float = 0.0  # this thread's CPU time inside the capacity and micro-batch schedulers
    scheduler_passes: int = 0  # steps that scheduled (had active requests), whether or not a batch ran


class PyExecutor(FaultIsolation):
    """Owns the active requests and runs one engine step at a time:

    fetch new requests -> capacity scheduler -> micro-batch scheduler -> prepare resources ->
    model forward -> decoder -> update requests -> update resources -> free finished requests.

    `enqueue` and `abort` may be called from any thread; `step` runs on one thread (the caller's for
    offline generation, a background thread when serving).
    """

    def __init__(
        self,
        capacity_scheduler: CapacityScheduler,
        micro_batch_scheduler: MicroBatchScheduler,
        resource_manager: ResourceManager,
        model_engine: ModelEngine,
        decoder: Decoder,
        detokenizer=None,
        component_names: dict[str, str] | None = None,
        drafter=None,
    ):
        self.capacity_scheduler = capacity_scheduler
        self.micro_batch_scheduler = micro_batch_scheduler
        self.resource_manager = resource_manager
        self.model_engine = model_engine
        self.decoder = decoder
        self.detokenizer = detokenizer  # optional: output text and stop strings need one
        self.component_names = component_names or {}  # kind (or resource manager) -> "kind 'name' (plugin)"
        self.drafter = drafter  # optional: proposes draft tokens that a step verifies (`propose(requests)`)
        self.kv_cache_manager = resource_manager.kv_cache_manager
        self.active: list[LlmRequest] = []  # arrival order
        self._waiting: list[LlmRequest] = []  # siblings (n > 1) waiting for the first one's prompt
        self._incoming: queue.SimpleQueue[LlmRequest] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._finished_by_abort: list[LlmRequest] = []  # aborted between steps, reported by the next
        self.num_steps = 0
        self.peak_running = 0  # the most requests computed in one step so far
        self.counters = StepCounters()

    # ---- requests in and out -----------------------------------------------------------------
    def enqueue(self, request: LlmRequest) -> None:
        self._incoming.put(request)

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed now if no step is running, else right after it."""
        self._aborts.put(request_id)
        if self._lock.acquire(blocking=False):
            try:
                aborted = self._fetch_new_requests()
                self._finished_by_abort.extend(aborted)  # reported by the next step
            finally:
                self._lock.release()

    def has_work(self) -> bool:
        return bool(self.active or self._waiting or self._finished_by_abort) or not self._incoming.empty() or not self._aborts.empty()

    def reset_prefix_cache(self) -> int:
        """Forget the cached prefixes no request holds (between steps); returns how many blocks."""
        with self._lock:
            return self.resource_manager.reset_prefix_cache()

    def fail_all(self, error: str) -> list[LlmRequest]:
        """Finish every request held or handed in with `error`, releasing what each holds (once
        the loop itself has broken and cannot go on)."""
        with self._lock:
            while not self._incoming.empty():
                self._waiting.append(self._incoming.get())
            self.active += self._waiting
            self._waiting = []
            self._fail(self.active, error)
            return self._release_finished()

    def num_running(self) -> int:
        return sum(1 for r in self.active if r.state in (RequestState.CONTEXT, RequestState.GENERATION))

    def num_waiting(self) -> int:
        queued = sum(1 for r in self.active if r.state is RequestState.QUEUED)
        return queued + len(self._waiting) + self._incoming.qsize()

    def validate(self, request: LlmRequest) -> str | None:
        """Why `request` cannot run, or None (remembered: the LLM front end asks before it
        enqueues, the loop again for whatever else enqueued it)."""
        if not request.validated:
            error = self._why_invalid(request)
            request.validated = error is None
            return error
        return None

    def _why_invalid(self, request: LlmRequest) -> str | None:
        n = request.prompt_len
        if n == 0:
            return "the prompt is empty"
        max_len = self.model_engine.max_model_len
        if n >= max_len:
            return f"the prompt has {n} tokens; the model's maximum length is {max_len} (prompt and output)"
        vocab = self.model_engine.vocab_size
        ids = request.prompt_token_ids
        bad = [] if plain_ints_within(ids, 0, vocab - 1) else [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            return f"prompt token ids must lie in [0, {vocab}); got {short_repr(bad[:5])}"
        params = request.sampling_params
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            return f"stop_token_ids must lie in [0, {vocab}); got {short_repr(bad[:5])}"
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > vocab:
                return f"{name} must not exceed the vocabulary size {vocab}; got {getattr(params, name)}"
        return self.resource_manager.never_fits(request)

    def _fetch_new_requests(self) -> list[LlmRequest]:
        """Admit arrivals into `active`; returns those that were rejected or aborted."""
        done, self._finished_by_abort = self._finished_by_abort, []
        while not self._incoming.empty():
            request = self._incoming.get()
            try:
                error = self.validate(request)
            except Exception as exc:
                logger.exception("validating request %s raised", request.request_id)
                error = f"validating the request raised {exc!r}"
            if error is None:
                self._waiting.append(request)
            else:
                self._finish(request, FinishReason.ERROR, error=error)
                done.append(request)
        # A sibling starts once the first request has its prompt in the cache (so it reuses it).
        ready = [r for r in self._waiting if r.follows is None or r.follows.output_token_ids or r.follows.is_finished]
        if ready:
            self.active += ready
            self._waiting = [r for r in self._waiting if r not in ready]
        aborted = set()
        while not self._aborts.empty():
            aborted.add(self._aborts.get())
        if aborted:
            for request in self.active + self._waiting:
                if request.request_id in aborted and not request.is_finished:
                    self._finish(request, FinishReason.ABORT)
                    if request in self._waiting:
                        self._waiting.remove(request)
                        done.append(request)
            done += self._release_finished()
        return done

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[LlmRequest]:
        """Run one step; returns the requests that got a new token or finished. A component that
        raises fails the requests it was working on (only the ones that make it raise on their
        own, where that can be told) and the engine goes on."""
        with self._lock:
            updated = self._fetch_new_requests()
            if not self.active:
                return updated
            try:
                scheduled = self._schedule()
                if scheduled:
                    updated += self._run(scheduled)
            except ComponentFault as fault:
                self._fail(fault.requests, str(fault))
            finally:
                for request in self.active:
                    request.num_scheduled_tokens = 0
                    request.clear_drafts()
            return list(dict.fromkeys(updated + self._release_finished()))

    def _schedule(self) -> list[LlmRequest]:
        """Draft, capacity-schedule, admit and micro-batch the active requests; prepare their
        resources. Drafts come first, so the capacity scheduler reserves blocks for them too."""
        for request in self.active:  # pick up prefixes cached since they were admitted
            if request.state is RequestState.CONTEXT:
                self._admit(request)
        live = [r for r in self.active if not r.is_finished]
        self._propose_drafts(live)
        self.counters.scheduler_passes += 1
        with self._scheduler_cpu_time():
            capacity = self._isolating("capacity_scheduler", live, lambda rs: self.capacity_scheduler.schedule(rs, self.kv_cache_manager))
        for request in capacity.preempted:
            self._free(request)
            if not request.is_finished:
                request.reset_for_recompute()
        fitting = [r for r in self._admitted(capacity.fitting) if not r.is_finished]
        with self._scheduler_cpu_time():
            scheduled = self._schedule_micro_batch(fitting)
        for request in scheduled:  # the drafts the token budget left room for
            del request.draft_token_ids[request.num_scheduled_tokens - (request.num_tokens - request.num_computed_tokens) :]
        if scheduled:
            self._isolating("resource_manager", scheduled, self.resource_manager.prepare_resources)
        return scheduled

    def _admitted(self, fitting: list[LlmRequest]) -> list[LlmRequest]:
        """The fitting requests, the queued ones among them admitted unless a resource manager has
        no room for them yet (those stay queued)."""
        admitted = []
        for request in fitting:
            if request.state is RequestState.QUEUED:
                if not self._can_admit(request):
                    continue
                request.state = RequestState.CONTEXT
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = self.model_engine.clock.now()
                self._admit(request)
            admitted.append(request)
        return admitted

    @contextmanager
    def _scheduler_cpu_time(self):
        started = time.thread_time()
        try:
            yield
        finally:
            self.counters.scheduler_cpu_seconds += time.thread_time() - started

    def _propose_drafts(self, live: list[LlmRequest]) -> None:
        """Draft tokens for the decoding requests, at most as many as each may still produce
        (less one: the target adds a token of its own). A drafter that raises only costs the drafts."""
        if self.drafter is None:
            return
        try:
            self.drafter.propose_step(live, self.kv_cache_manager)
        except Exception:
            logger.exception("%s raised; this step verifies no drafts", self.describe("drafter"))
            for request in live:
                request.clear_drafts()
        for request in live:  # (only a decoding request verifies drafts)
            room = request.draft_room(self.model_engine.max_model_len) if is_decoding(request) else 0
            del request.draft_token_ids[max(0, room) :]

    def _run(self, scheduled: list[LlmRequest]) -> list[LlmRequest]:
        """Forward and decode the batch, then update requests and resources; returns the requests
        that got a token."""
        step_started = time.perf_counter()
        self.num_steps += 1
        self.peak_running = max(self.peak_running, len(scheduled))
        results = self._compute(scheduled)
        counters = self.counters
        for request in scheduled:
            if not request.is_finished:
                counters.tokens_forwarded += request.num_scheduled_tokens
                counters.attended_positions += request.scheduled_attention
                request.num_computed_tokens += request.num_scheduled_tokens
        for request, tokens, logprobs in results:
            self._append_run(request, tokens, logprobs)
        try:
            self._isolating("resource_manager", [r for r in scheduled if r.error is None], self.resource_manager.update_resources)
        except ComponentFault as fault:
            self._fail(fault.requests, str(fault))
        counters.tokens_sampled += sum(len(tokens) for _, tokens, _ in results)
        counters.step_seconds += time.perf_counter() - step_started
        return [request for request, _, _ in results]

    def _compute(self, batch: list[LlmRequest]) -> list[tuple]:
        """(request, tokens, logprobs) of each request of `batch` that samples. When the batch
        raises, each request is computed again alone: the ones that still raise fail, the others
        go on."""
        try:
            return self._forward_and_decode(batch)
        except ComponentFault as fault:
            logger.warning("%s; computing the batch's %d requests one by one", fault, len(batch))
        results = []
        for request in batch:
            try:
                results += self._forward_and_decode([request])
            except ComponentFault as fault:
                self._fail([request], str(fault))
        return results

    def _forward_and_decode(self, batch: list[LlmRequest]) -> list[tuple]:
        started = time.perf_counter()
        with self._blame("model_engine", batch):
            output = self.model_engine.forward(batch, self.resource_manager)
        self.counters.forward_seconds += time.perf_counter() - started
        with self._blame("decoder", batch):
            runs = decode_runs(self.decoder, output.sampled, output.logits)
        if output.prompt_logits:
            with self._blame("decoder", batch):
                self.decoder.record_prompt_logprobs(output.prompt_logits)
        return runs

    def _append_run(self, request: LlmRequest, tokens: list[int], logprobs: list) -> None:
        """Append a request's new tokens (stopping where one finishes it), then move its cursor
        back over the drafts it did not accept: their cache slots are written again later, and
        no block holding one is ever keyed for prefix reuse."""
        with self._fails_alone("detokenizer", request):
            head = len(tokens) - 1 if len(tokens) > 1 and not self._may_stop(request, tokens[:-1]) else 0
            self._extend(request, tokens[:head], logprobs[:head])
            for token, token_logprobs in zip(tokens[head:], logprobs[head:]):
                self._append_token(request, token, token_logprobs)
                if request.is_finished:
                    break
        proposed = len(request.draft_token_ids)
        request.num_computed_tokens -= proposed + 1 - len(tokens)
        request.clear_drafts()
        if proposed:
            self._observe_drafts(request, proposed, len(tokens) - 1)

    def _may_stop(self, request: LlmRequest, tokens: list[int]) -> bool:
        """Whether appending `tokens` one by one could finish the request or produce text (else
        they may be appended at once: a long run of accepted drafts)."""
        params = request.sampling_params
        if self.detokenizer is not None and params.detokenize:
            return True
        n = len(tokens)
        if len(request.output_token_ids) + n >= params.max_tokens or request.num_tokens + n >= self.model_engine.max_model_len:
            return True
        stops = {*params.stop_token_ids, *(() if params.ignore_eos else request.eos_token_ids)}
        return bool(stops) and not stops.isdisjoint(tokens)

    def _extend(self, request: LlmRequest, tokens: list[int], logprobs: list) -> None:
        """`_append_token` for tokens that `_may_stop` cleared."""
        if not tokens:
            return
        request.output_token_ids += tokens
        kept = [lp for lp in logprobs if lp is not None]
        if kept:
            request.logprobs = (request.logprobs or []) + kept
        if request.first_token_time is None:
            request.first_token_time = self.model_engine.clock.now()
        request.state = RequestState.GENERATION

    def _observe_drafts(self, request: LlmRequest, proposed: int, accepted: int) -> None:
        counters = self.counters
        counters.verify_steps += 1
        counters.draft_tokens += proposed
        counters.accepted_draft_tokens += accepted
        try:
            self.drafter.observe(request, proposed, accepted)
        except Exception:
            logger.exception("%s raised in observe", self.describe("drafter"))

    def _can_admit(self, request: LlmRequest) -> bool:
        with self._fails_alone("resource_manager", request):
            return self.resource_manager.can_admit(request)
        return False

    def _admit(self, request: LlmRequest) -> None:
        with self._fails_alone("resource_manager", request):
            self.resource_manager.admit(request)

    def _free(self, request: LlmRequest) -> None:
        """Release what the request holds (a manager that raises fails it, if it still runs)."""
        with self._fails_alone("resource_manager", request):
            self.resource_manager.free_resources(request)

    def _fail(self, requests: list[LlmRequest], error: str) -> None:
        for request in requests:
            if not request.is_finished:
                self._finish(request, FinishReason.ERROR, error=error)

    def _schedule_micro_batch(self, fitting: list[LlmRequest]) -> list[LlmRequest]:
        """Apply the micro-batch scheduler's plan, less the requests the resource managers defer to
        the next step (the KV cache: prompt chunks that would recompute a block an earlier request
        of the batch computes); the budget they free goes to the others."""
        held_back: set[int] = set()
        while True:
            candidates = [r for r in fitting if id(r) not in held_back]
            plan = self._isolating("micro_batch_scheduler", candidates, self.micro_batch_scheduler.schedule)
            chunks = {id(chunk.request): chunk for chunk in plan}
            deferred = self._isolating("resource_manager", [c.request for c in plan], lambda rs: self.resource_manager.defer([chunks[id(r)] for r in rs]))
            if not deferred:
                for chunk in plan:
                    chunk.request.num_scheduled_tokens = chunk.num_tokens
                return [chunk.request for chunk in plan]
            held_back.update(id(r) for r in deferred)

    def _append_token(self, request: LlmRequest, token: int, token_logprobs=None) -> None:
        request.output_token_ids.append(token)
        if token_logprobs is not None:
            if request.logprobs is None:
                request.logprobs = []
            request.logprobs.append(token_logprobs)
        now = self.model_engine.clock.now()
        if request.first_token_time is None:
            request.first_token_time = now
        request.state = RequestState.GENERATION
        params = request.sampling_params
        may_stop = len(request.output_token_ids) >= params.min_tokens
        stop_string = self.detokenizer.update(request, token, may_stop) if self.detokenizer is not None and params.detokenize else None
        if may_stop and not params.ignore_eos and token in request.eos_token_ids:
            self._finish(request, FinishReason.STOP, stop_reason=token)
        elif may_stop and token in params.stop_token_ids:
            self._finish(request, FinishReason.STOP, stop_reason=token)
        elif may_stop and stop_string is not None:
            self._finish(request, FinishReason.STOP, stop_reason=stop_string)
        elif len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.model_engine.max_model_len:
            self._finish(request, FinishReason.LENGTH)

    def _finish(self, request: LlmRequest, reason: FinishReason, *, stop_reason=None, error=None) -> None:
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        request.error = error
        request.finish_time = self.model_engine.clock.now()

    def _release_finished(self) -> list[LlmRequest]:
        finished = [r for r in self.active if r.is_finished]
        if finished:
            for request in finished:
                self._free(request)
            self.active = [r for r in self.active if not r.is_finished]
        return finished
