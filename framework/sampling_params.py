"""Per-request generation settings, validated before a request enters the engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """What to generate and how to pick each token.

    The decoder applies, in this order: repetition / presence / frequency penalties, `min_tokens`
    (stop tokens masked), temperature, top-k, top-p, min-p, then samples (or takes the argmax when
    `temperature == 0`). `logprobs` are those of the model's raw distribution, before any of that.
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 (or -1): all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled one always included)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token (from its second token on)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""

        def integer(name, minimum, allow_none=False, maximum=None):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
            if maximum is not None and value > maximum:
                raise ValueError(f"{name} must be an integer <= {maximum}, got {value!r}")

        def number(name, low, high=None, low_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if value < low or (low_open and value == low) or (high is not None and value > high):
                bound = f"({low}, {high}]" if low_open else f"[{low}, {high if high is not None else 'inf'}]"
                raise ValueError(f"{name} must lie in {bound}, got {value!r}")

        integer("n", 1)
        integer("max_tokens", 1)
        integer("min_tokens", 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        number("temperature", 0.0)
        integer("top_k", 0)
        number("top_p", 0.0, 1.0, low_open=True)
        number("min_p", 0.0, 1.0)
        integer("seed", -(2**63), allow_none=True, maximum=2**64 - 1)  # torch.Generator.manual_seed's range
        number("repetition_penalty", 0.0, low_open=True)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        integer("logprobs", 0, allow_none=True)
        integer("prompt_logprobs", 0, allow_none=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
