"""The step loop."""

from __future__ import annotations

import logging
import queue
import threading
import time

from framework.decoder.base import Decoder
from framework.engine.base import ModelEngine
from framework.request import FinishReason, LlmRequest, RequestState
from framework.resources.base import ResourceManager
from framework.scheduler.base import CapacityScheduler, MicroBatchScheduler

logger = logging.getLogger(__name__)


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
    ):
        self.capacity_scheduler = capacity_scheduler
        self.micro_batch_scheduler = micro_batch_scheduler
        self.resource_manager = resource_manager
        self.model_engine = model_engine
        self.decoder = decoder
        self.kv_cache_manager = resource_manager.kv_cache_manager
        self.active: list[LlmRequest] = []  # arrival order
        self._incoming: queue.SimpleQueue[LlmRequest] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.num_steps = 0

    # ---- requests in and out -----------------------------------------------------------------
    def enqueue(self, request: LlmRequest) -> None:
        self._incoming.put(request)

    def abort(self, request_id: str) -> None:
        self._aborts.put(request_id)

    def has_work(self) -> bool:
        return bool(self.active) or not self._incoming.empty() or not self._aborts.empty()

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
        need = self.kv_cache_manager.get_needed_resource_to_completion(request)
        total = self.kv_cache_manager.get_max_resource_count()
        if need > total:
            return (
                f"prompt ({n} tokens) + max_tokens ({request.sampling_params.max_tokens}) needs {need} KV blocks; "
                f"the cache has {total} (raise kv_cache.max_tokens or lower max_tokens)"
            )
        return None

    def _fetch_new_requests(self) -> list[LlmRequest]:
        """Admit queued arrivals into `active`; returns those that were rejected or aborted."""
        done = []
        while not self._incoming.empty():
            request = self._incoming.get()
            error = self.validate(request)
            if error is None:
                self.active.append(request)
            else:
                self._finish(request, FinishReason.ERROR, error=error)
                done.append(request)
        aborted = set()
        while not self._aborts.empty():
            aborted.add(self._aborts.get())
        if aborted:
            for request in self.active:
                if request.request_id in aborted:
                    self._finish(request, FinishReason.ABORT)
            done += self._release_finished()
        return done

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[LlmRequest]:
        """Run one step; returns the requests that got a new token or finished."""
        with self._lock:
            updated = self._fetch_new_requests()
            if not self.active:
                return updated
            capacity = self.capacity_scheduler.schedule(self.active, self.kv_cache_manager)
            for request in capacity.preempted:
                self.resource_manager.free_resources(request)
                request.reset_for_recompute()
            for request in capacity.fitting:
                if request.state is RequestState.QUEUED:
                    request.state = RequestState.CONTEXT
            scheduled = self.micro_batch_scheduler.schedule(capacity.fitting)
            if not scheduled:
                return updated
            self.num_steps += 1
            self.resource_manager.prepare_resources(scheduled)
            batch = [r for r in scheduled if r.num_scheduled_tokens > 0]  # prefix hits may cover a chunk
            try:
                output = self.model_engine.forward(batch, self.resource_manager) if batch else None
                tokens = self.decoder.decode(output.sampled, output.logits) if output else []
            except Exception as exc:  # the engine must keep serving: fail this batch, not the process
                logger.exception("step failed")
                for request in scheduled:
                    self._finish(request, FinishReason.ERROR, error=f"engine step failed: {exc!r}")
                return updated + self._release_finished()
            for request in batch:
                request.num_computed_tokens += request.num_scheduled_tokens
            for request, token in zip(output.sampled if output else (), tokens):
                self._append_token(request, token)
                updated.append(request)
            self.resource_manager.update_resources(scheduled)
            for request in scheduled:
                request.num_scheduled_tokens = 0
            self._release_finished()
            return updated

    def _append_token(self, request: LlmRequest, token: int) -> None:
        request.output_token_ids.append(token)
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
        request.state = RequestState.GENERATION
        params = request.sampling_params
        if not params.ignore_eos and token in request.eos_token_ids:
            self._finish(request, FinishReason.STOP, stop_reason=token)
        elif token in params.stop_token_ids:
            self._finish(request, FinishReason.STOP, stop_reason=token)
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
