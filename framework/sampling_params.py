"""Per-request generation settings, validated before a request enters the engine."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field

MAX_N = 128  # completions per prompt, as OpenAI allows
MAX_LOGPROBS = 20  # as OpenAI allows; far below any vocabulary, so the decoder's top-k always fits
# Stop strings and stop token ids are checked after every generated token on the executor thread,
# which serves every client: these bounds keep that per-token scan cheap.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # top_k (and a prompt's token ids) become int64 tensors
SEED_RANGE = (INT64_MIN, 2**64 - 1)  # torch.Generator.manual_seed's range


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
    stop: list[str] = field(default_factory=list)  # a single str means [str]
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled one always included)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token (from its second token on)
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, no output text (a benchmark's requests); no stop strings then

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _fresh_list(self.stop)
        self.stop_token_ids = _fresh_list(self.stop_token_ids)
        if _is_int(self.top_k) and self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (a type or a value out of range)."""
        if _is_int(self.n) and self.n > MAX_N:
            raise ValueError(f"n must be at most {MAX_N} (completions per prompt, as OpenAI allows), got {short_repr(self.n)}")
        _check_int("n", self.n, 1)
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check_number("temperature", self.temperature, 0.0)
        _check_int("top_k", self.top_k, 0, INT64_MAX)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_int("seed", self.seed, *SEED_RANGE, allow_none=True)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, low_open=True)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_stop(self.stop)
        _check_stop_token_ids(self.stop_token_ids)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        _check_bool("ignore_eos", self.ignore_eos)
        _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS, allow_none=True)
        _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS, allow_none=True)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_bool("detokenize", self.detokenize)
        if not self.detokenize and self.stop:
            raise ValueError("stop strings are matched in the output text: they need detokenize=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class _ShortRepr(reprlib.Repr):
    """reprlib's truncating repr, also for integers too long for `repr` (over 4300 digits)."""

    def repr_int(self, x, level):
        return repr(x) if x.bit_length() <= 64 else f"<a {x.bit_length()}-bit integer>"


_REPR = _ShortRepr()
_REPR.maxstring = _REPR.maxother = 80


def short_repr(value) -> str:
    """`value` for an error message: truncated, and safe for any object."""
    return _REPR.repr(value)


def plain_ints_within(values, low: int, high: int) -> bool:
    """Whether every value is an int (no bool) in [low, high], checked at C speed: the common
    case, before a caller's loop that names what is wrong."""
    return set(map(type, values)) == {int} and low <= min(values) and max(values) <= high


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fresh_list(value):
    """A new list from None, a list or a tuple; anything else unchanged (for `validate` to reject)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_int(name, value, low, high=None, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer{' or None' if allow_none else ''}, got {short_repr(value)}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {short_repr(value)}")


def _check_number(name, value, low, high=None, low_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {short_repr(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {short_repr(value)}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = ("(" if low_open else "[") + f"{low}, " + (f"{high}]" if high is not None else "inf)")
        raise ValueError(f"{name} must lie in {bound}, got {short_repr(value)}")


def _check_bool(name, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {short_repr(value)}")


def _check_stop(stop) -> None:
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {short_repr(stop)}")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop[{i}] must be a non-empty string, got {short_repr(s)}")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stop[{i}] has {len(s)} characters; at most {MAX_STOP_STRING_CHARS} are allowed")


def _check_stop_token_ids(ids) -> None:
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"stop_token_ids must be a list of integers, got {short_repr(ids)}")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids has {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
    for i, t in enumerate(ids):
        if not _is_int(t) or t < 0:
            raise ValueError(f"stop_token_ids[{i}] must be a non-negative integer, got {short_repr(t)}")
