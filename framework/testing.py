"""Test helpers for framework and its plugins, and a pytest plugin (`pytest -p framework.testing`).

Everything runs through the real `PyExecutor`; only the model is fake. `FakeEngine` makes the next
token a fixed function of the whole context, which it reads back from the KV cache, so a block table
that points at the wrong block changes the output and fails loudly.

    req("a", prompt_len=8, max_tokens=4)            an LlmRequest with a prompt no other shares
                                                    (priority=, tenant=, ttft_slo_ms=: its scheduling metadata)
    ids(requests)                                   their request ids
    make_scheduler(MyScheduler, MyConfig())         built as the engine builds a scheduler
    make_router(MyRouter, MyConfig())               built as the replay driver builds a router
    tiny_kv_cache(max_tokens=32)                    a real PagedKVCacheManager of a few blocks
    start(kv_cache, a, b)                           a and b running: prompts cached, first token out
    make_executor(capacity=..., kv_cache=...)       a PyExecutor on a FakeEngine
    run_to_completion(executor, {0: [a], 2: [b]})   -> Trace: per step fitting, preempted, batch, finished
    conformance_suite("capacity_scheduler", MyScheduler, MyConfig())   a parametrised pytest test

With `-p framework.testing` pytest also gets the fixtures `kv_cache` (a `tiny_kv_cache()`) and
`fake_engine` (a `FakeEngine()`). Importing this module imports neither torch nor the executor.
"""

from __future__ import annotations

import functools
import itertools
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable

import pytest

from framework.drafter.base import Drafter
from framework.engine.base import ForwardOutput, ModelEngine
from framework.request import LlmRequest
from framework.sampling_params import SamplingParams

FRESH_TOKENS = range(1000, 31000)  # `req` draws prompts from here, in turn: no two requests share one
_next_fresh = itertools.cycle(FRESH_TOKENS)


def _group_config(base, config=None):
    """A config group as the builder hands it to a factory: an OmegaConf node of the group's
    dataclass `base`, with the component's own settings (`config`, a dataclass) flat beside them."""
    from dataclasses import asdict, is_dataclass

    from omegaconf import OmegaConf

    return OmegaConf.create({**asdict(base), **(asdict(config) if is_dataclass(config) else {})})


def _resolve(factory):
    """A factory given as a "module:attr" string, imported; anything else as it is."""
    from framework.plugins.kinds import load

    return load(factory) if isinstance(factory, str) else factory


# ---- requests and components -----------------------------------------------------------------
def req(
    request_id: str, prompt_len: int = 8, max_tokens: int = 4, *, prompt=None, priority=None, tenant=None, ttft_slo_ms=None, **sampling
) -> LlmRequest:
    """A queued LlmRequest, greedy unless `sampling` says otherwise (any SamplingParams field).
    Without `prompt`, its `prompt_len` token ids are shared with no other request's."""
    prompt = list(prompt) if prompt is not None else [next(_next_fresh) for _ in range(prompt_len)]
    params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    return LlmRequest(request_id, prompt, params, priority=priority, tenant=tenant, ttft_slo_ms=ttft_slo_ms)


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


def make_scheduler(factory, config=None, *, max_batch_size: int = 8, max_num_tokens: int = 64):
    """A capacity or micro-batch scheduler, called as the engine's builder calls it:
    `factory(scheduler_group_config, own_config)`."""
    from framework.config import SchedulerConfig

    group = _group_config(SchedulerConfig(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens), config)
    return _resolve(factory)(group, config)


def make_router(factory, config=None, *, block_size: int = 4):
    """A router, built as the replay driver builds one: `factory(replay_config, own_config, block_size)`."""
    from framework.config import ReplayConfig

    return _resolve(factory)(_group_config(ReplayConfig(), config), config, block_size)


def fake_kv_spec(max_model_len: int = 256, sliding_window: int | None = None):
    """The KV cache shape `FakeEngine` reads and writes: one layer, one head of width 2."""
    import torch

    from framework.resources.base import KVCacheSpec

    return KVCacheSpec(
        num_layers=1, num_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"), max_model_len=max_model_len,
        sliding_window=sliding_window,
    )


def tiny_kv_cache(max_tokens: int = 64, block_size: int = 4, *, factory=None, config=None, enable_prefix_caching: bool = True, spec=None):
    """A KV cache manager of `max_tokens / block_size` blocks (the built-in `paged` one unless
    `factory` says otherwise), called as the builder calls it: `factory(kv_config, own_config, spec)`."""
    from framework.config import KVCacheConfig
    from framework.resources.paged_kv_cache import PagedKVCacheManager

    kv_config = KVCacheConfig(block_size=block_size, max_tokens=max_tokens, memory_fraction=0.0, enable_prefix_caching=enable_prefix_caching)
    return _resolve(factory or PagedKVCacheManager)(_group_config(kv_config, config), config, spec or fake_kv_spec())


def make_decoder(factory=None, config=None, seed: int = 0):
    """A decoder (the built-in `greedy` one unless `factory` says otherwise), called as the builder
    calls it: `factory(decoder_config, own_config, seed=seed)`."""
    from framework.config import DecoderConfig

    return _resolve(factory or "framework.decoder.greedy:GreedyDecoder")(_group_config(DecoderConfig(name="test"), config), config, seed=seed)


def make_engine(factory, config=None, checkpoint_dir=None, plugins=None):
    """A model engine on `checkpoint_dir` (default: `tiny_checkpoint()`), float32 on the CPU, called
    as the builder calls it: `factory(engine_config, own_config, model_config, checkpoint_dir,
    plugins)`; `plugins` defaults to the built-ins alone."""
    from framework.config import EngineConfig, ModelConfig
    from framework.plugins.manager import create_plugin_manager

    model = _group_config(ModelConfig(dtype="float32", device="cpu"))
    plugins = plugins or create_plugin_manager(autoload=False)
    return _resolve(factory)(_group_config(EngineConfig(), config), config, model, checkpoint_dir or tiny_checkpoint(), plugins)


@functools.cache
def tiny_checkpoint(vocab_size: int = 512):
    """A random two-layer Llama saved as a Hugging Face folder without a tokenizer, made once per
    process and vocabulary size in a temporary folder (removed at exit)."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(tempfile.mkdtemp(prefix="framework-tiny-llama-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)  # peaked logits: no near-ties between chunkings
    model.save_pretrained(str(path))
    return path


# ---- a model-free engine -------------------------------------------------------------------------
class FakeEngine(ModelEngine):
    """A ModelEngine without a model. It writes each computed token (and its position) into the KV
    cache through the request's block table, and reads a request's whole context back from there
    before it samples, failing if any slot holds another token; the logits it returns put their
    maximum on `next_token(context)`, a fixed function of the context. So the greedy output of a
    request is `greedy(prompt, n)`, whatever the batching, preemption or prefix reuse on the way.
    With `seconds_per_step` it keeps a VirtualClock that each forward advances by that much plus
    `seconds_per_token` per computed token: a simulated engine in miniature. With `sliding_window`
    it reads back (and checks) only the slots a layer of that window would read."""

    def __init__(
        self, vocab_size: int = 32768, max_model_len: int = 256, seconds_per_step: float | None = None, seconds_per_token: float = 0.0,
        sliding_window: int | None = None,
    ):
        import torch

        self.vocab_size, self.max_model_len, self.sliding_window = vocab_size, max_model_len, sliding_window
        if seconds_per_step is not None:  # simulated time: each forward advances a clock of its own
            from framework.engine.clock import VirtualClock

            self.clock = VirtualClock()
        self.seconds_per_step, self.seconds_per_token = seconds_per_step, seconds_per_token
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self._row = torch.randn(vocab_size, generator=torch.Generator().manual_seed(0))  # rolled per context
        self._row_top = int(self._row.argmax())

    def kv_cache_spec(self):
        return fake_kv_spec(self.max_model_len, self.sliding_window)

    def next_token(self, context) -> int:
        digest = 0
        for token in context:
            digest = (digest * 1_000_003 + token + 1) % (2**61 - 1)
        return digest % self.vocab_size

    def greedy(self, prompt, max_tokens: int) -> list[int]:
        """The tokens a greedy decoder produces after `prompt`."""
        context = list(prompt)
        for _ in range(max_tokens):
            context.append(self.next_token(context))
        return context[len(prompt) :]

    def logits(self, context):
        import torch

        return torch.roll(self._row, self.next_token(context) - self._row_top)

    def forward(self, scheduled, resource_manager):
        import torch

        kv = resource_manager.kv_cache_manager
        sampled, rows = [], []
        for request in scheduled:
            end = request.num_computed_tokens + request.num_scheduled_tokens
            self._write(kv, request, request.num_computed_tokens, end)
            if end == request.num_tokens + len(request.draft_token_ids):  # its chunk reaches its last token
                sampled.append(request)
                rows += [self.logits(self._read(kv, request, n)) for n in range(request.num_tokens, end + 1)]
        logits = torch.stack(rows) if rows else torch.zeros(0, self.vocab_size)
        if self.seconds_per_step is not None:
            self.clock.advance(self.seconds_per_step + self.seconds_per_token * sum(r.num_scheduled_tokens for r in scheduled))
        return ForwardOutput(logits, sampled)

    @staticmethod
    def _slots(kv, request, end: int):
        import torch

        table = kv.get_block_table(request)
        if len(table) * kv.block_size < end:
            raise AssertionError(
                f"request {request.request_id!r} needs slots for {end} tokens; its block table has "
                f"{len(table)} blocks of {kv.block_size} (prepare_resources left it short)"
            )
        positions = torch.arange(end)
        return torch.tensor(table)[positions // kv.block_size], positions % kv.block_size

    def _write(self, kv, request, start: int, end: int) -> None:
        import torch

        blocks, offsets = self._slots(kv, request, end)
        keys, values = kv.get_kv_caches()[0]
        keys[0, blocks[start:], offsets[start:], 0] = torch.tensor(request.tokens(start, end), dtype=keys.dtype)
        values[0, blocks[start:], offsets[start:], 0] = torch.arange(start, end, dtype=values.dtype)

    def _read(self, kv, request, end: int) -> list[int]:
        blocks, offsets = self._slots(kv, request, end)
        keys, values = kv.get_kv_caches()[0]
        tokens = keys[0, blocks, offsets, 0].long().tolist()
        positions = values[0, blocks, offsets, 0].long().tolist()
        expected = request.tokens(0, end)
        first_read = 0 if self.sliding_window is None else max(0, end - self.sliding_window)
        for position, (token, written_at, want) in enumerate(zip(tokens, positions, expected)):
            if position >= first_read and (token != want or written_at != position):
                raise AssertionError(
                    f"request {request.request_id!r}: the KV slot of position {position} (block "
                    f"{int(blocks[position])}) holds token {token} written for position {written_at}, not "
                    f"token {want}: the block table points at a block holding other tokens"
                )
        return expected  # (what every slot read holds)


class OracleDrafter(Drafter):
    """Proposes, for each decoding request, `right` tokens of the true continuation (`next_token` of
    the context) followed by `wrong` tokens that are not, so every verify step accepts some drafts
    and rolls the others back."""

    def __init__(self, next_token: Callable[[list[int]], int], vocab_size: int, right: int = 2, wrong: int = 1):
        self.next_token, self.vocab_size, self.right, self.wrong = next_token, vocab_size, right, wrong

    def propose(self, requests) -> None:
        for request in requests:
            context = request.tokens(0, request.num_tokens)
            drafts: list[int] = []
            for _ in range(self.right):
                drafts.append(self.next_token(context + drafts))
            for _ in range(self.wrong):
                drafts.append((self.next_token(context + drafts) + 1) % self.vocab_size)
            request.draft_token_ids = drafts

    def observe(self, request, proposed: int, accepted: int) -> None:
        """Told how many of a request's drafts the step accepted; an oracle learns nothing from it."""


# ---- the executor ----------------------------------------------------------------------------
def make_executor(
    *, capacity=None, micro_batch=None, kv_cache=None, decoder=None, engine=None, drafter=None,
    max_batch_size: int = 8, max_num_tokens: int = 16,
):
    """A real PyExecutor. Components left out are the built-ins (`guaranteed_no_evict`, `fcfs`,
    `paged` from `tiny_kv_cache`, `greedy`) on a `FakeEngine`; the budgets apply to the schedulers
    made here. The resource managers are assembled as the builder does: the per-request states of
    the decoder and the drafter (where they keep any), then the KV cache manager."""
    from framework.executor.py_executor import PyExecutor
    from framework.resources.base import ResourceManager

    engine = engine or FakeEngine()
    budgets = dict(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens)
    capacity = capacity or make_scheduler("framework.scheduler.capacity:GuaranteedNoEvictScheduler", **budgets)
    micro_batch = micro_batch or make_scheduler("framework.scheduler.micro_batch:FCFSMicroBatchScheduler", **budgets)
    kv_cache = kv_cache or tiny_kv_cache(spec=engine.kv_cache_spec())
    decoder = decoder or make_decoder()
    owners = {"decoder": decoder, "drafter": drafter}
    states = {key: getattr(owner, "request_states", None) for key, owner in owners.items()}
    managers = {key: manager for key, manager in states.items() if manager is not None} | {"kv_cache": kv_cache}
    return PyExecutor(capacity, micro_batch, ResourceManager(managers), engine, decoder, drafter=drafter)


def start(kv_cache, *requests: LlmRequest, engine=None) -> None:
    """Make `requests` running as a real step leaves them: admitted, their prompt computed into
    `kv_cache` and their first token sampled. Give them `max_tokens >= 2`, or they finish (and free
    their blocks) right away."""
    budget = sum(r.prompt_len for r in requests)
    executor = make_executor(kv_cache=kv_cache, engine=engine, max_batch_size=len(requests), max_num_tokens=budget)
    for request in requests:
        executor.enqueue(request)
    for _ in requests:  # a request sharing a prompt block with another waits a step to reuse it
        executor.step()
        if all(r.output_token_ids for r in requests):
            return
    raise AssertionError(f"could not start {[r.request_id for r in requests if not r.output_token_ids]}: {[r.error for r in requests]}")


@dataclass
class Step:
    """What one executor step did, as its components saw it."""

    fitting: list[str] = field(default_factory=list)  # the capacity scheduler's answer, in its order
    preempted: list[str] = field(default_factory=list)
    batch: dict[str, int] = field(default_factory=dict)  # request id -> tokens the engine computed (drafts included)
    finished: list[str] = field(default_factory=list)


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)

    @property
    def finished(self) -> list[str]:
        """Request ids in the order they finished."""
        return [rid for step in self.steps for rid in step.finished]

    @property
    def preemptions(self) -> list[tuple[int, str]]:
        """(step, request id) of every preemption."""
        return [(i, rid) for i, step in enumerate(self.steps) for rid in step.preempted]


@contextmanager
def watch(obj, method: str, observer):
    """Within the block, each `obj.<method>(*args)` first calls `observer(*args)`, which returns a
    function that then receives the result: a test sees what the executor asks of a component and
    what it answers, changing neither."""
    inner = getattr(obj, method)
    had_own = method in vars(obj)

    def watched(*args, **kwargs):
        seen = observer(*args, **kwargs)
        result = inner(*args, **kwargs)
        seen(result)
        return result

    setattr(obj, method, watched)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, method, inner)
        else:
            delattr(obj, method)


@contextmanager
def observe(executor):
    """Record each `executor.step()` into a Trace, from the capacity scheduler's answers and the
    engine's batches."""
    trace = Trace()

    def stepping():
        trace.steps.append(Step())
        return lambda updated: trace.steps[-1].finished.extend(r.request_id for r in updated if r.is_finished)

    def capacity(active, kv_cache):
        def record(out):
            trace.steps[-1].fitting, trace.steps[-1].preempted = ids(out.fitting), ids(out.preempted)

        return record

    def forward(scheduled, resource_manager):
        trace.steps[-1].batch.update({r.request_id: r.num_scheduled_tokens for r in scheduled})
        return lambda output: None

    with ExitStack() as stack:
        stack.enter_context(watch(executor, "step", stepping))
        stack.enter_context(watch(executor.capacity_scheduler, "schedule", capacity))
        stack.enter_context(watch(executor.model_engine, "forward", forward))
        yield trace


def run_to_completion(executor, arrivals, max_steps: int = 1000) -> Trace:
    """Step `executor` until every request has finished. `arrivals` is a list of requests (all
    enqueued before the first step) or {step: [requests enqueued before that step]}."""
    schedule = arrivals if isinstance(arrivals, dict) else {0: list(arrivals)}
    last_arrival = max(schedule, default=0)
    with observe(executor) as trace:
        for step in range(max_steps):
            for request in schedule.get(step, ()):
                executor.enqueue(request)
            if step > last_arrival and not executor.has_work():
                return trace
            executor.step()
    raise AssertionError(f"requests still unfinished after {max_steps} steps: {ids(executor.active)}")


# ---- conformance, as pytest tests --------------------------------------------------------------
def conformance_suite(kind: str, factory, config=None):
    """A pytest test running each case of `kind`'s conformance check (the `conformance` entry of
    `framework.plugins.kinds.KINDS`) on `factory` (a class, a callable or a "module:attr" string)
    with `config`, one parametrised test per case. Assign it to a module-level `test_...` name."""
    from framework.plugins.kinds import KINDS, load

    if KINDS[kind].conformance is None:
        raise ValueError(f"{KINDS[kind].label} has no conformance check; kinds with one: {', '.join(k.name for k in KINDS.values() if k.conformance)}")
    check = load(KINDS[kind].conformance)

    @pytest.mark.parametrize("case", list(check.cases))
    def test_conforms(case):
        check.cases[case](_resolve(factory), config)

    return test_conforms


@pytest.fixture
def kv_cache():
    """A fresh `tiny_kv_cache()`: 16 blocks of 4 tokens."""
    return tiny_kv_cache()


@pytest.fixture
def fake_engine():
    """A `FakeEngine()` (vocabulary 32768, max_model_len 256)."""
    return FakeEngine()
