"""The user-facing entry point: tokenizer, detokenizer and an executor built from the config."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any, Sequence

from framework.config import GROUPS, ModelConfig, compose
from framework.outputs import CompletionOutput, RequestOutput
from framework.plugins.manager import Plugins, create_plugin_manager
from framework.request import LlmRequest
from framework.sampling_params import SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Prompt = str | Sequence[int]


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _field_owners() -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    groups = {"model": ModelConfig, **{g: base for g, (base, _) in GROUPS.items()}}
    for group, cls in groups.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(group)
    return owners


def options_to_overrides(model: str | None, options: dict[str, Any]) -> list[str]:
    """`LLM(...)` keyword options as Hydra overrides: `scheduler="max_utilization"` selects a group
    option, `max_num_tokens=256` sets the one field of that name, `**{"kv_cache.block_size": 8}`
    sets a dotted key."""
    overrides = []
    if "max_tokens" in options:
        raise TypeError(
            "max_tokens is a per-request setting (SamplingParams.max_tokens); the KV cache size is kv_cache.max_tokens"
        )
    if model is not None:
        overrides.append(f"model.path={_override_value(str(model))}")
    owners = _field_owners()
    for key, value in options.items():
        if key in GROUPS:
            if not isinstance(value, str):
                raise TypeError(f"{key} selects an implementation by name; got {value!r}")
            overrides.append(f"{key}={value}")
        elif "." in key:
            overrides.append(f"{key}={_override_value(value)}")
        elif key in owners and len(owners[key]) == 1:
            overrides.append(f"{owners[key][0]}.{key}={_override_value(value)}")
        elif key in owners:
            raise TypeError(f"option {key!r} is ambiguous; say which: {', '.join(g + '.' + key for g in owners[key])}")
        else:
            raise TypeError(f"unknown option {key!r}; options: {', '.join(sorted(owners))} (or 'group.field')")
    return overrides


class LLM:
    """`LLM()` loads the default model (SmolLM2-135M-Instruct); `LLM(model=folder)` any Llama-family
    Hugging Face checkpoint. Keyword options are config overrides (see `options_to_overrides`)."""

    def __init__(self, model: str | None = None, *, config=None, plugins: Plugins | None = None, **options):
        from framework.executor.builder import build_executor, validate_names
        from framework.models.checkpoint import resolve_checkpoint

        from framework.config import check_choice

        self.plugins = plugins or create_plugin_manager()
        if config is not None and (model is not None or options):
            raise TypeError("pass either a composed config or model/options, not both")
        if config is None:
            for group in GROUPS:
                if isinstance(options.get(group), str):
                    check_choice(group, options[group], self.plugins)
            config = compose(options_to_overrides(model, options), self.plugins)
        self.config = config
        validate_names(self.config, self.plugins)
        checkpoint_dir = resolve_checkpoint(self.config.model.path)
        self.tokenizer = _load_tokenizer(checkpoint_dir)
        self.executor = build_executor(self.config, self.plugins, checkpoint_dir)
        self.eos_token_ids = _eos_token_ids(self.executor.model_engine, self.tokenizer)
        self._ids = itertools.count()

    # ---- requests ----------------------------------------------------------------------------
    def _make_request(self, prompt: Prompt, params: SamplingParams, priority: int | None = None) -> LlmRequest:
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        return LlmRequest(
            request_id=str(next(self._ids)),
            prompt_token_ids=token_ids,
            sampling_params=params,
            prompt=text,
            priority=priority,
            eos_token_ids=self.eos_token_ids,
        )

    def _output(self, request: LlmRequest) -> RequestOutput:
        params = request.sampling_params
        text = self.tokenizer.decode(request.output_token_ids, skip_special_tokens=params.skip_special_tokens)
        reason = request.finish_reason.value if request.finish_reason else None
        metrics = {"arrival_time": request.arrival_time, "num_preemptions": request.num_preemptions}
        if request.first_token_time is not None:
            metrics["first_token_time"] = request.first_token_time
        if request.finish_time is not None:
            metrics["finish_time"] = request.finish_time
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[CompletionOutput(0, text, list(request.output_token_ids), reason, request.stop_reason)],
            finished=request.is_finished,
            error=request.error,
            metrics=metrics,
        )

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt (text or token ids) or a list of them. Every prompt is checked
        before any runs: a bad one raises ValueError and leaves the engine as it was. `priority`
        (one int per prompt, lower is more important) is read by priority-aware schedulers."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        priorities = list(priority) if priority is not None else [None] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(priorities)} priorities")
        requests = [self._make_request(p, sp, pr) for p, sp, pr in zip(prompts, params, priorities)]
        for i, request in enumerate(requests):
            request.sampling_params.validate()
            error = self.executor.validate(request)
            if error:
                raise ValueError(f"prompt {i}: {error}")
        for request in requests:
            self.executor.enqueue(request)
        self._run(requests, use_tqdm)
        return [self._output(r) for r in requests]

    def _run(self, requests: list[LlmRequest], use_tqdm: bool) -> None:
        from tqdm.auto import tqdm

        pending = {r.request_id for r in requests}
        with tqdm(total=len(requests), desc="Generating", disable=not use_tqdm or len(requests) < 2) as bar:
            while pending:
                for request in self.executor.step():
                    if request.is_finished and request.request_id in pending:
                        pending.discard(request.request_id)
                        bar.update(1)
                if not self.executor.has_work() and pending:
                    raise RuntimeError(f"engine went idle with {len(pending)} requests unfinished")

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = False) -> RequestOutput:
        """One conversation (a list of {"role", "content"} dicts) through the checkpoint's chat template."""
        prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
        return self.generate([list(prompt_ids)], sampling_params, use_tqdm=use_tqdm)[0]

    # ---- introspection -----------------------------------------------------------------------
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
