"""Per-request state that a component keeps for itself (a decoder's penalty counts and seeded
generator, the detokenizer's offsets), released with the request through the resource lifecycle."""

from __future__ import annotations

from typing import Any, Callable

from framework.request import LlmRequest
from framework.resources.base import BaseResourceManager


class RequestStates(BaseResourceManager):
    """A state per running request, made on first use. It survives preemption (a recomputed
    request goes on drawing from the same generator) and goes when the request finishes."""

    def __init__(self) -> None:
        self._states: dict[str, Any] = {}

    def get(self, request: LlmRequest, make: Callable[[], Any]) -> Any:
        state = self._states.get(request.request_id)
        if state is None:
            state = self._states[request.request_id] = make()
        return state

    def peek(self, request: LlmRequest) -> Any:
        return self._states.get(request.request_id)

    def __len__(self) -> int:
        return len(self._states)

    def prepare_resources(self, scheduled) -> None:
        pass

    def update_resources(self, scheduled) -> None:
        pass

    def free_resources(self, request: LlmRequest) -> None:
        if request.is_finished:
            self._states.pop(request.request_id, None)

    def get_max_resource_count(self) -> int:
        return 0  # holds no counted resource

    def get_needed_resource_to_completion(self, request) -> int:
        return 0
