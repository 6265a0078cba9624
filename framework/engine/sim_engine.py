"""The simulated model engine (`engine=sim`): no weights, no KV tensors, no arithmetic. Each step
advances the engine's clock by the cost model's duration for the batch's shape and returns
placeholder logits, so the real schedulers, KV cache manager (block accounting on the `meta`
device), decoder and executor run unchanged around it.

The placeholder logits make every sampled row emit one fixed token that is no special token
(`engine.token_id`); a request that honours EOS gets EOS as its `engine.eos_after`-th token.
Rows are as wide as the step needs: up to that token, unless a request's sampling settings read
other token ids (penalties, logprobs, a `min_tokens` mask), which get the whole vocabulary. Every
id past a row's width has logit -inf (ForwardOutput's contract), so the decoder's argmax and
draws are the same as over the whole vocabulary, at a fraction of the work.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from framework.engine.base import ForwardOutput, ModelEngine
from framework.engine.clock import Clock, VirtualClock, WallClock
from framework.engine.dtype import DTYPES
from framework.models.checkpoint import every_layer_window, load_hf_config
from framework.resources.base import KVCacheSpec
from framework.sim.cost_model import CostModel
from framework.sim.model_shape import ModelShape
from framework.sim.hardware import Hardware
from framework.sim.roofline import RooflineCostModel
from framework.sim.step_profile import StepProfile
from framework.sim.step_shape import StepShape

logger = logging.getLogger(__name__)

LOW = -1e4  # the logit of every token a row does not emit: finite (logprobs stay numbers), never drawn
CLOCKS = {"virtual": VirtualClock, "wall": WallClock, "auto": VirtualClock}  # the CLI makes `auto` wall for mode=serve


class SimModelEngine(ModelEngine):
    def __init__(self, engine_config, config, model_config, checkpoint_dir, plugins):
        """Built from the config: the checkpoint's config.json (no weights), and a cost model from
        `engine.profile` (measured) or else the roofline of `engine.hardware` (predicted)."""
        hf_config = load_hf_config(checkpoint_dir)
        model = ModelShape.of(hf_config)
        if config.profile:
            profile = StepProfile.load(config.profile)
            if profile.model_shape != model:
                raise ValueError(f"the profile {config.profile} was measured on another model ({profile.model_shape}); this checkpoint is {model}")
            if model_config.dtype not in ("auto", profile.dtype):
                raise ValueError(f"the profile {config.profile} was measured in {profile.dtype}; model.dtype={model_config.dtype}")
            dtype_name, memory_bytes, cost_model = profile.dtype, profile.memory_bytes, profile.cost_model
        else:
            hardware = Hardware.load(config.hardware, plugins.config_search_paths())
            dtype_name = "bfloat16" if model_config.dtype == "auto" else model_config.dtype
            memory_bytes = hardware.memory_bytes
            cost_model = RooflineCostModel(model, hardware, torch.empty((), dtype=DTYPES[dtype_name]).element_size())
        if config.clock not in CLOCKS:
            raise ValueError(f"engine.clock must be one of {', '.join(CLOCKS)}; got {config.clock!r}")
        logger.info("engine=sim: %s", cost_model.describe())
        self._set_up(
            model=model,
            max_model_len=model_config.max_model_len or hf_config.max_position_embeddings,
            dtype=DTYPES[dtype_name],
            memory_bytes=memory_bytes,
            cost_model=cost_model,
            clock=CLOCKS[config.clock](),
            token_id=config.token_id if config.token_id is not None else first_plain_token(checkpoint_dir, hf_config),
            eos_after=config.eos_after,
            full_vocab_logits=config.full_vocab_logits,
            sliding_window=every_layer_window(hf_config),
        )

    @classmethod
    def of(cls, **settings) -> SimModelEngine:
        """An engine from its parts (the keywords of `_set_up`), without a config or checkpoint."""
        engine = cls.__new__(cls)
        engine._set_up(**settings)
        return engine

    def _set_up(
        self, *, model: ModelShape, max_model_len: int, dtype: torch.dtype, memory_bytes: int, cost_model: CostModel,
        clock: Clock, token_id: int, eos_after: int = 128, full_vocab_logits: bool = False, sliding_window: int | None = None,
    ) -> None:
        if not 0 <= token_id < model.vocab_size:
            raise ValueError(f"engine.token_id must lie in [0, {model.vocab_size}); got {token_id}")
        if eos_after < 1:
            raise ValueError(f"engine.eos_after must be >= 1; got {eos_after}")
        self.model_shape, self.vocab_size, self.max_model_len = model, model.vocab_size, max_model_len
        self.device, self.dtype, self.memory_bytes = torch.device("cpu"), dtype, memory_bytes
        self.cost_model, self.clock = cost_model, clock
        self.simulated = cost_model.describe()
        self.token_id, self.eos_after, self.sliding_window = token_id, eos_after, sliding_window
        self.narrow = model.vocab_size if full_vocab_logits else token_id + 1
        # the requests (ids) whose drafts the next forward runs as decode steps, and the steps' seconds
        self._run: tuple[set[int], list[float]] = (set(), [])
        # the clock's time at the end of each decode step that the last forward stood for (a
        # decode run: one per step, which stamps each request's tokens; else empty)
        self.run_step_ends: list[float] = []
        self._row = torch.full((model.vocab_size,), LOW)
        self._row[token_id] = 0.0

    def kv_cache_spec(self) -> KVCacheSpec:
        m = self.model_shape
        return KVCacheSpec(
            num_layers=m.num_layers, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, dtype=self.dtype,
            device=torch.device("meta"), max_model_len=self.max_model_len, memory_bytes=self.memory_bytes,
            sliding_window=self.sliding_window,
        )

    def expect_run(self, requests, seconds: list[float]) -> None:
        """The next forward runs these requests' drafts as decode steps, one after another
        (`framework/sim/decode_runs.py`), instead of verifying them in one step; `seconds`: the
        steps' predicted durations, if each request verifies all its drafts."""
        self._run = ({id(r) for r in requests}, seconds)

    def decode_step_seconds(self, starts: list[int], steps: int) -> list[float]:
        """The predicted seconds of `steps` decode steps, one after another, of requests whose
        caches hold `starts` tokens before the first."""
        batch, total = len(starts), sum(starts)
        return self.cost_model.decode_steps_seconds(batch, range(total + batch, total + batch * (steps + 1), batch))

    def forward(self, scheduled, resource_manager):
        sampled: list[tuple] = []  # (request, drafts it verifies)
        shape = StepShape.of(scheduled, sampled)
        (run, seconds), self._run, self.run_step_ends = self._run, (set(), []), []
        if run and len(sampled) == len(scheduled) and all(id(r) in run for r in scheduled):
            self._advance_run(sampled, seconds)
        else:
            self.clock.advance(self.cost_model.step_seconds(shape))
        eos_rows, width, rows = [], self.narrow, 0
        for request, drafts in sampled:
            params = request.sampling_params
            if not params.ignore_eos and request.eos_token_ids:
                due = self.eos_after - 1 - len(request.output_token_ids)  # the row whose token is the eos_after-th
                if due <= drafts:
                    eos = request.eos_token_ids[0]
                    eos_rows.append((rows + max(due, 0), eos))
                    width = max(width, eos + 1)
            if width < self.vocab_size and self._reads_vocabulary(request):
                width = self.vocab_size
            rows += 1 + drafts
        logits = self._row[:width].expand(rows, width).clone()
        for row, eos in eos_rows:
            logits[row, eos] = -LOW  # above the placeholder token, which still wins where a min_tokens mask hides EOS
        return ForwardOutput(logits=logits, sampled=[r for r, _ in sampled], prompt_logits=self._prompt_logits(scheduled))

    def _advance_run(self, sampled, seconds: list[float]) -> None:
        """Advance the clock over a decode run: step j decodes the requests with more than j
        rows (all of them, unless a scheduler cut some drafts)."""
        rows = [(1 + drafts, request.num_computed_tokens) for request, drafts in sampled]
        longest = max(n for n, _ in rows)
        if not all(n == longest == len(seconds) for n, _ in rows):  # not as planned: price each step
            seconds = [self.decode_step_seconds([start + step for n, start in rows if n > step], 1)[0] for step in range(longest)]
        self.run_step_ends = self.clock.advance_each(seconds)

    def _reads_vocabulary(self, request) -> bool:
        """Whether the decoder reads token ids of this request's row beyond the narrow width."""
        params = request.sampling_params
        if params.logprobs is not None or params.has_penalties:
            return True
        if params.min_tokens > len(request.output_token_ids):  # the decoder masks these ids
            masked = [*params.stop_token_ids, *(() if params.ignore_eos else request.eos_token_ids)]
            return any(t >= self.narrow for t in masked)
        return False

    def _prompt_logits(self, scheduled) -> list:
        return [
            (r, r.num_computed_tokens, self._row.expand(r.num_scheduled_tokens, self.vocab_size))
            for r in scheduled
            if r.sampling_params.prompt_logprobs is not None and r.num_computed_tokens < r.prompt_len - 1
        ]


def first_plain_token(checkpoint_dir, hf_config) -> int:
    """The smallest token id that is no special token: neither one of config.json's bos, eos, pad
    or unk ids nor a special added token of the tokenizer's files."""
    special: set[int] = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(hf_config, name, None)
        special.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    folder = Path(checkpoint_dir)
    try:
        tokenizer = json.loads((folder / "tokenizer.json").read_text())
        special.update(t["id"] for t in tokenizer.get("added_tokens", ()) if t.get("special"))
    except (OSError, ValueError):
        pass
    try:
        decoder = json.loads((folder / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
        special.update(int(i) for i, t in decoder.items() if t.get("special"))
    except (OSError, ValueError, AttributeError):
        pass
    return next(i for i in range(hf_config.vocab_size) if i not in special)
