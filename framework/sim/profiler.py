"""`mode=profile`: time whole engine steps of chosen shapes on this machine, then fit the
simulated engine's cost model to them.

The grid: a prompt chunk of N tokens after C cached ones (prefill), B requests decoding at a
context of C tokens (decode), and B decoding requests beside a prompt chunk (mixed). A shape is
reached without paying for it: the tokens before the timed step are "computed" by a simulated
engine that takes no time (their KV slots hold zeros, which cost the real kernels what any values
do), a cached context comes from the real prefix cache, and then the real engine runs the timed
steps through the real executor. Each sample's shape is counted from the batch the schedulers
actually made, so the fit never relies on a grid point being hit exactly.
"""

from __future__ import annotations

import random
import time
from typing import Callable, NamedTuple

import torch

from framework.engine.base import ModelEngine
from framework.engine.clock import VirtualClock
from framework.engine.sim_engine import SimModelEngine, first_plain_token
from framework.models.checkpoint import load_hf_config, resolve_checkpoint
from framework.request import LlmRequest
from framework.resources.paged_kv_cache import device_memory
from framework.sampling_params import SamplingParams
from framework.sim.cost_model import CostModel
from framework.sim.model_shape import ModelShape
from framework.sim.serving_runs import serving_samples
from framework.sim.step_profile import StepProfile
from framework.sim.step_shape import StepShape


class _NoTime(CostModel):
    def step_seconds(self, shape: StepShape) -> float:
        return 0.0

    def describe(self) -> str:
        return "no time: steps that only set up a profiled shape"


class _Recording(ModelEngine):
    """The real engine, remembering the shape of the last batch it computed."""

    def __init__(self, engine: ModelEngine):
        self.engine, self.shape = engine, None
        self.vocab_size, self.max_model_len, self.clock = engine.vocab_size, engine.max_model_len, engine.clock
        self.device, self.dtype, self.backend = engine.device, engine.dtype, engine.backend

    def kv_cache_spec(self):
        return self.engine.kv_cache_spec()

    def forward(self, scheduled, resource_manager):
        self.shape = StepShape.of(scheduled)
        return self.engine.forward(scheduled, resource_manager)


class Needs(NamedTuple):
    """What a grid point asks of the engine's budgets and KV cache."""

    requests: int  # running at once
    step_tokens: int  # computed in the timed step
    longest: int  # tokens of the longest request
    kv_tokens: int  # held in the KV cache at once


class StepProfiler:
    def __init__(self, llm, settings, progress: Callable[[str], None] = lambda line: None):
        self.llm, self.executor, self.settings, self.progress = llm, llm.executor, settings, progress
        self.scheduler = llm.config.scheduler
        real = self.executor.model_engine
        checkpoint = resolve_checkpoint(llm.config.model.path)
        self.checkpoint = checkpoint.name
        hf_config = load_hf_config(checkpoint)
        self.model_shape = ModelShape.of(hf_config)
        self.real, self.recording = real, _Recording(real)
        self.first_token = first_plain_token(checkpoint, hf_config)
        self.setup = SimModelEngine.of(
            model=self.model_shape, max_model_len=real.max_model_len, dtype=real.dtype, memory_bytes=0,
            cost_model=_NoTime(), clock=VirtualClock(), token_id=self.first_token,
        )
        self.kv = self.executor.kv_cache_manager
        self.rng = random.Random(settings.seed)
        self.samples: list[tuple[StepShape, float]] = []
        self._ids = 0

    # ---- the grid ----------------------------------------------------------------------------
    def run(self) -> StepProfile:
        s = self.settings
        for context in s.prefill_context:
            for n in s.prefill_tokens:
                needs = Needs(requests=1, step_tokens=n, longest=context + n + 1, kv_tokens=context + n + 1)
                self._point(f"prefill {n} tokens after {context}", needs, self._prefill, n, context)
        for context in s.decode_context:
            for batch in s.decode_batch:
                decode_steps = self._decode_tokens(batch, context)
                needs = Needs(batch, batch, context + decode_steps, batch * (context + decode_steps))
                self._point(f"decode batch {batch} at {context} tokens", needs, self._decode, batch, context)
        context = sorted(s.decode_context)[len(s.decode_context) // 2] if s.decode_context else 64
        for batch in s.mixed_batch:
            for n in s.mixed_tokens:
                decode_steps = self._mixed_tokens()
                needs = Needs(batch + 1, batch + n, context + decode_steps, batch * (context + decode_steps) + n + 1)
                self._point(f"decode batch {batch} at {context} tokens + a {n}-token chunk", needs, self._mixed, batch, context, n)
        served, serving = serving_samples(self.llm, s, self.timed, self.executor.reset_prefix_cache, self.progress)
        self.samples += served
        if not self.samples:
            raise ValueError("no profile shape fits this engine's budgets and KV cache (see the skipped shapes above)")
        device, dtype = self.real.device, str(self.real.dtype).removeprefix("torch.")
        setup = {**self._setup_record(), "serving": serving}
        return StepProfile(self.model_shape, str(device), dtype, device_memory(device), self.samples, setup).fitted()

    def _setup_record(self) -> dict:
        """What the figures depend on besides the model, device and dtype, for the profile's reader."""
        return {
            "checkpoint": self.checkpoint,
            "backend": self.real.backend_name,
            "threads": torch.get_num_threads(),
            "scheduler": {k: self.scheduler[k] for k in ("capacity", "micro_batch", "max_batch_size", "max_num_tokens")},
            "block_size": self.kv.block_size,
            "warmup_steps": self.settings.warmup_steps,
            "repeats": self.settings.repeats,
        }

    def _point(self, label: str, needs: Needs, measure, *args) -> None:
        why_not = self._why_not(needs)
        if why_not:
            self.progress(f"{label}: skipped ({why_not})")
            return
        self.executor.reset_prefix_cache()
        timed = sorted((sample for sample in measure(*args) if sample[0] is not None), key=lambda sample: sample[1])
        if timed:  # the median step stands for the point: one sample each, robust to a slow outlier
            self.samples.append(timed[len(timed) // 2])
            self.progress(f"{label}: {timed[len(timed) // 2][1] * 1e3:.2f} ms a step")

    def _why_not(self, needs: Needs) -> str | None:
        budget = self.scheduler
        if needs.requests > budget.max_batch_size:
            return f"scheduler.max_batch_size={budget.max_batch_size}"
        if needs.step_tokens > budget.max_num_tokens:
            return f"scheduler.max_num_tokens={budget.max_num_tokens}"
        if needs.longest > self.real.max_model_len:
            return f"max_model_len={self.real.max_model_len}"
        capacity = self.kv.get_max_resource_count() * self.kv.block_size
        if needs.kv_tokens + needs.requests * self.kv.block_size > capacity:
            return f"needs {needs.kv_tokens} KV tokens; the cache holds {capacity} (raise kv_cache.max_tokens or memory_fraction)"
        return None

    # ---- the shapes --------------------------------------------------------------------------
    def _prefill(self, tokens: int, context: int) -> list[tuple[StepShape | None, float]]:
        prefix = self._tokens(context - context % self.kv.block_size)
        if prefix:  # cached once, then every timed chunk reuses it
            self._untimed_until_idle([self._request(prefix, 1)])
        steps = []
        for _ in range(self.settings.warmup_steps + self.settings.repeats):
            request = self._request(prefix + self._tokens(tokens), 1)
            self.executor.enqueue(request)
            steps.append(self._timed_step())
            self._untimed_until_idle([])
        return steps[self.settings.warmup_steps :]

    def _decode_tokens(self, batch: int, context: int) -> int:
        """The output tokens of a decode point's requests: the timed steps and a margin, plus one
        per step their prompts take (the first prompts decode while the budget computes the
        others): else the first would finish before the timed steps, which would time a smaller
        batch than asked."""
        s = self.settings
        return s.warmup_steps + s.repeats + 2 + -(-batch * context // self.scheduler.max_num_tokens)

    def _decode(self, batch: int, context: int) -> list[tuple[StepShape | None, float]]:
        s = self.settings
        requests = self._decoding(batch, context, self._decode_tokens(batch, context))
        steps = [self._timed_step() for _ in range(s.warmup_steps + s.repeats)]
        self._abort(requests)
        return steps[s.warmup_steps :]

    def _mixed_tokens(self) -> int:
        """The output tokens of a mixed point's decoding requests: they decode through every timed
        chunk and the untimed steps after it (a generous margin)."""
        s = self.settings
        return 10 * (s.warmup_steps + s.repeats) + 10

    def _mixed(self, batch: int, context: int, tokens: int) -> list[tuple[StepShape | None, float]]:
        s = self.settings
        requests = self._decoding(batch, context, self._mixed_tokens())
        steps = []
        for _ in range(s.warmup_steps + s.repeats):
            self.executor.enqueue(self._request(self._tokens(tokens), 1))
            steps.append(self._timed_step())
            self._untimed_until(lambda: self.executor.num_waiting() == 0 and all(r.output_token_ids for r in self.executor.active))
        self._abort(requests)
        return steps[s.warmup_steps :]

    # ---- driving the executor ----------------------------------------------------------------
    def _decoding(self, batch: int, context: int, max_tokens: int) -> list[LlmRequest]:
        """`batch` requests of `context` prompt tokens, their prompts computed untimed."""
        requests = [self._request(self._tokens(context), max_tokens) for _ in range(batch)]
        for request in requests:
            self.executor.enqueue(request)
        self._untimed_until(lambda: all(r.output_token_ids for r in requests))
        return requests

    def _timed_step(self) -> tuple[StepShape | None, float]:
        """One step of the real engine: the shape it computed (None: it computed nothing) and its seconds."""
        shape, seconds, _ = self.timed(self.executor.step)
        return shape, seconds

    def timed(self, step: Callable) -> tuple[StepShape | None, float, object]:
        """Run `step` (one step of the executor, or of the LLM around it) on the real engine:
        the shape it computed, its seconds and what it returned."""
        self.executor.model_engine, self.recording.shape = self.recording, None
        try:
            started = time.perf_counter()
            result = step()
            seconds = time.perf_counter() - started
        finally:
            self.executor.model_engine = self.real
        return self.recording.shape, seconds, result

    def _untimed_until(self, done: Callable[[], bool], max_steps: int = 1_000_000) -> None:
        self.executor.model_engine = self.setup
        try:
            for _ in range(max_steps):
                if done():
                    return
                self.executor.step()
            raise RuntimeError("profiling: a shape's setup did not finish")
        finally:
            self.executor.model_engine = self.real

    def _untimed_until_idle(self, requests: list[LlmRequest]) -> None:
        for request in requests:
            self.executor.enqueue(request)
        self._untimed_until(lambda: not self.executor.has_work())

    def _abort(self, requests: list[LlmRequest]) -> None:
        for request in requests:
            self.executor.abort(request.request_id)
        self._untimed_until_idle([])

    def _request(self, prompt: list[int], max_tokens: int) -> LlmRequest:
        self._ids += 1
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return LlmRequest(f"profile-{self._ids}", prompt, params)

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.first_token, self.model_shape.vocab_size) for _ in range(n)]


def profile_steps(llm, settings, progress: Callable[[str], None] = lambda line: None) -> StepProfile:
    """Time the steps of `llm`'s engine over the grid in `settings` (the `profile` config group)."""
    return StepProfiler(llm, settings, progress).run()
