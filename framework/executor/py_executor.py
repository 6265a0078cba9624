"""The step loop."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from framework.decoder.base import Decoder
from framework.engine.base import ModelEngine
from framework.request import FinishReason, LlmRequest, RequestState
from framework.resources.base import ResourceManager
from framework.scheduler.base import CapacityScheduler, MicroBatchScheduler

logger = logging.getLogger(__name__)


@dataclass
class StepCounters:
    """Running totals over all steps, for benchmarks and metrics."""

    step_seconds: float = 0.0  # whole steps that ran a forward
    forward_seconds: float = 0.0  # inside model_engine.forward
    tokens_forwarded: int = 0
    tokens_sampled: int = 0
    attended_positions: int = 0  # sum over forwarded tokens of the context each attends to


class PyExecutor:
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
    ):
        self.capacity_scheduler = capacity_scheduler
        self.micro_batch_scheduler = micro_batch_scheduler
        self.resource_manager = resource_manager
        self.model_engine = model_engine
        self.decoder = decoder
        self.detokenizer = detokenizer  # optional: output text and stop strings need one
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

    def num_running(self) -> int:
        return sum(1 for r in self.active if r.state in (RequestState.CONTEXT, RequestState.GENERATION))

    def num_waiting(self) -> int:
        queued = sum(1 for r in self.active if r.state is RequestState.QUEUED)
        return queued + len(self._waiting) + self._incoming.qsize()

    def validate(self, request: LlmRequest) -> str | None:
        """Why `request` cannot run, or None."""
        n = request.prompt_len
        if n == 0:
            return "the prompt is empty"
        max_len = self.model_engine.max_model_len
        if n >= max_len:
            return f"the prompt has {n} tokens; the model's maximum length is {max_len} (prompt and output)"
        vocab = self.model_engine.vocab_size
        bad = [t for t in request.prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            return f"prompt token ids must lie in [0, {vocab}); got {bad[:5]}"
        need = self.kv_cache_manager.blocks_at_completion(request)
        total = self.kv_cache_manager.get_max_resource_count()
        if need > total:
            return (
                f"prompt ({n} tokens) + max_tokens ({request.sampling_params.max_tokens}) needs {need} KV blocks; "
                f"the cache has {total} (raise kv_cache.max_tokens or lower max_tokens)"
            )
        return None

    def _fetch_new_requests(self) -> list[LlmRequest]:
        """Admit arrivals into `active`; returns those that were rejected or aborted."""
        done, self._finished_by_abort = self._finished_by_abort, []
        while not self._incoming.empty():
            request = self._incoming.get()
            error = self.validate(request)
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
        """Run one step; returns the requests that got a new token or finished."""
        with self._lock:
            updated = self._fetch_new_requests()
            if not self.active:
                return updated
            for request in self.active:  # pick up prefixes cached since they were admitted
                if request.state is RequestState.CONTEXT:
                    self.resource_manager.admit(request)
            capacity = self.capacity_scheduler.schedule(self.active, self.kv_cache_manager)
            for request in capacity.preempted:
                self.resource_manager.free_resources(request)
                request.reset_for_recompute()
            for request in capacity.fitting:
                if request.state is RequestState.QUEUED:
                    request.state = RequestState.CONTEXT
                    self.resource_manager.admit(request)
            scheduled = self._schedule_micro_batch(capacity.fitting)
            if not scheduled:
                return updated
            step_started = time.perf_counter()
            self.num_steps += 1
            self.peak_running = max(self.peak_running, len(scheduled))
            self.resource_manager.prepare_resources(scheduled)
            counters = self.counters
            try:
                forward_started = time.perf_counter()
                output = self.model_engine.forward(scheduled, self.resource_manager)
                counters.forward_seconds += time.perf_counter() - forward_started
                decoded = self.decoder.decode(output.sampled, output.logits)
                if output.prompt_logits:
                    self._record_prompt_logprobs(output.prompt_logits)
            except Exception as exc:  # the engine must keep serving: fail this batch, not the process
                logger.exception("step failed")
                for request in scheduled:
                    self._finish(request, FinishReason.ERROR, error=f"engine step failed: {exc!r}")
                return updated + self._release_finished()
            for request in scheduled:
                start, n = request.num_computed_tokens, request.num_scheduled_tokens
                counters.tokens_forwarded += n
                counters.attended_positions += n * start + n * (n + 1) // 2
                request.num_computed_tokens = start + n
            logprobs = decoded.logprobs or [None] * len(decoded.token_ids)
            for request, token, token_logprobs in zip(output.sampled, decoded.token_ids, logprobs):
                self._append_token(request, token, token_logprobs)
                updated.append(request)
            self.resource_manager.update_resources(scheduled)
            for request in scheduled:
                request.num_scheduled_tokens = 0
            self._release_finished()
            counters.tokens_sampled += len(output.sampled)
            counters.step_seconds += time.perf_counter() - step_started
            return updated

    def _schedule_micro_batch(self, fitting: list[LlmRequest]) -> list[LlmRequest]:
        """The micro-batch scheduler's batch, less the prompt chunks that would recompute blocks an
        earlier request of the batch is computing (they reuse them next step); the budget they
        free goes to the others."""
        held_back: set[int] = set()
        while True:
            scheduled = self.micro_batch_scheduler.schedule([r for r in fitting if id(r) not in held_back])
            duplicates = self.kv_cache_manager.duplicate_prefills(scheduled)
            if not duplicates:
                return scheduled
            for request in scheduled:
                request.num_scheduled_tokens = 0
            held_back.update(id(r) for r in duplicates)

    def _record_prompt_logprobs(self, prompt_logits) -> None:
        """Logprobs of prompt tokens from the logits of the positions before them."""
        import torch

        from framework.decoder.logprobs import top_logprobs

        for request, start, logits in prompt_logits:
            if request.prompt_logprobs is None:
                request.prompt_logprobs = [None]  # the first prompt token has no logprob
            # logits row j predicts the token at position start + j + 1; keep prompt positions not yet seen
            first = len(request.prompt_logprobs) - 1 - start
            count = min(logits.shape[0], request.prompt_len - 1 - start) - first
            if count <= 0:
                continue
            targets = torch.tensor(request.prompt_token_ids[start + first + 1 : start + first + 1 + count], device=logits.device)
            request.prompt_logprobs += top_logprobs(logits[first : first + count], targets, request.sampling_params.prompt_logprobs)

    def _append_token(self, request: LlmRequest, token: int, token_logprobs=None) -> None:
        request.output_token_ids.append(token)
        if token_logprobs is not None:
            if request.logprobs is None:
                request.logprobs = []
            request.logprobs.append(token_logprobs)
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
        request.state = RequestState.GENERATION
        params = request.sampling_params
        may_stop = len(request.output_token_ids) >= params.min_tokens
        stop_string = self.detokenizer.update(request, token, may_stop) if self.detokenizer is not None else None
        if may_stop and not params.ignore_eos and token in request.eos_token_ids:
            self._finish(request, FinishReason.STOP, stop_reason=token)
        elif may_stop and token in params.stop_token_ids:
            self._finish(request, FinishReason.STOP, stop_reason=token)
        elif may_stop and stop_string is not None:
            self._finish(request, FinishReason.STOP, stop_reason=stop_string)
        elif len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.model_engine.max_model_len:
            self._finish(request, FinishReason.LENGTH)

    @staticmethod
    def _finish(request: LlmRequest, reason: FinishReason, *, stop_reason=None, error=None) -> None:
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        request.error = error
        request.finish_time = time.monotonic()

    def _release_finished(self) -> list[LlmRequest]:
        finished = [r for r in self.active if r.is_finished]
        if finished:
            for request in finished:
                self.resource_manager.free_resources(request)
            self.active = [r for r in self.active if not r.is_finished]
        return finished
