"""Incremental detokenization and stop strings.

Each new token's text is the difference between decoding a short window of recent tokens with and
without it; a window ending in an incomplete UTF-8 sequence ("\ufffd") waits for the next token.
Pieces therefore join exactly, and multi-byte characters (emoji, CJK) arrive whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from framework.resources.request_states import RequestStates

PROMPT_CONTEXT = 5  # prompt tokens kept as context for the first output token's spacing


@dataclass
class _State:
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.request_states = RequestStates()  # request -> _State, freed when it finishes

    def update(self, request, token: int, check_stop: bool = True) -> str | None:
        """Append `token`'s text to `request.output_text`; return the stop string it completed, if
        any (then the text is cut there)."""
        state = self.request_states.get(request, lambda: _initial_state(request))
        state.ids.append(token)
        skip = request.sampling_params.skip_special_tokens
        before = self.tokenizer.decode(state.ids[state.prefix_offset : state.read_offset], skip_special_tokens=skip)
        after = self.tokenizer.decode(state.ids[state.prefix_offset :], skip_special_tokens=skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None
        old_len = len(request.output_text)
        request.output_text += after[len(before) :]
        state.prefix_offset, state.read_offset = state.read_offset, len(state.ids)
        return self._match_stop(request, old_len) if check_stop else None

    @staticmethod
    def _match_stop(request, old_len: int) -> str | None:
        params = request.sampling_params
        if not params.stop:
            return None
        text = request.output_text
        best = None
        for stop in params.stop:
            index = text.find(stop, max(0, old_len - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        request.output_text = text[: index + len(stop)] if params.include_stop_str_in_output else text[:index]
        return stop


def _initial_state(request) -> _State:
    context = request.prompt_token_ids[-PROMPT_CONTEXT:]
    return _State(list(context), 0, len(context))


def visible_text(request) -> str:
    """The text that may be shown now: while a request runs, the tail that could still turn out to
    be the start of a stop string is held back."""
    text = request.output_text
    if request.is_finished or not request.sampling_params.stop:
        return text
    hold = max(len(s) for s in request.sampling_params.stop) - 1
    return text[: len(text) - hold] if hold > 0 else text
