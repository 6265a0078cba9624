"""OpenAI-compatible request bodies, and their translation to SamplingParams.

Bodies are parsed strictly: JSON numbers are not coerced (`true` or `1.0` is no token id), and
`NaN`/`Infinity` are refused; the JSON parser itself refuses lone surrogates, invalid UTF-8 and
nesting deeper than about 200 levels."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from framework.sampling_params import SamplingParams


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # extensions, as vLLM accepts them
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # scheduling metadata (extensions, as vLLM takes `priority`); `user` is OpenAI's own field
    priority: int | None = None
    tenant: str | None = None
    user: str | None = None
    ttft_slo_ms: float | None = None

    def scheduling(self) -> dict:
        """`new_request_group`'s scheduling keywords: the tenant is `tenant`, else a non-empty `user`."""
        return {"priority": self.priority, "tenant": self.tenant if self.tenant is not None else self.user or None, "ttft_slo_ms": self.ttft_slo_ms}

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop if self.stop is not None else [],
            stop_token_ids=self.stop_token_ids if self.stop_token_ids is not None else [],
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        return list(p)

    def sampling_params(self) -> SamplingParams:
        return self._params(self.max_tokens, self.logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None  # required, may be null

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.text or "" for part in content if part.type == "text")
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = next((m for m in (self.max_completion_tokens, self.max_tokens) if m is not None), default_max_tokens)
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)
