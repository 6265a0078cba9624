"""How the executor keeps a fault with its request (docs/architecture.md, "Faults").

Every call into a component runs under `_blame`, which turns an exception into a ComponentFault
naming the component as the builder registered it and the requests it is laid on: per-request
calls fail their request (`_fails_alone`); batched calls are tried again per request and only those
that still raise fail (`_isolating`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from framework.request import LlmRequest
from framework.resources.base import ResourceManagerError

logger = logging.getLogger(__name__)


class ComponentFault(RuntimeError):
    """A component raised inside a step; `requests` are the ones the fault is laid on."""

    def __init__(self, component: str, cause: Exception, requests: list[LlmRequest]):
        super().__init__(f"{component} raised {cause!r}")
        self.requests = requests


class FaultIsolation:
    """The executor's fault rules; it provides `component_names` and `_fail(requests, error)`."""

    component_names: dict[str, str]

    @contextmanager
    def _blame(self, kind: str, requests: list[LlmRequest]):
        """Turn an exception raised inside into a ComponentFault naming the component (and its
        plugin) and the requests it fails."""
        try:
            yield
        except ComponentFault:
            raise
        except Exception as exc:
            if isinstance(exc, ResourceManagerError):
                kind, exc = exc.name, exc.__cause__
            logger.exception("%s raised", self.describe(kind))
            raise ComponentFault(self.describe(kind), exc, requests) from exc

    def describe(self, kind: str) -> str:
        """A component's name for messages: its kind, registered name and plugin."""
        return self.component_names.get(kind, kind.replace("_", " "))

    def _isolating(self, kind: str, requests: list[LlmRequest], call):
        """`call(requests)`. If it raises, each request is tried alone: the fault is laid on those
        that raise. When none does, the call is made once more, and a second raise fails them all.
        (Calls made this way must be repeatable: scheduling is a query, preparing and updating
        resources twice for a request changes nothing the second time.)"""
        try:
            with self._blame(kind, requests):
                return call(requests)
        except ComponentFault as fault:
            culprits = [r for r in requests if self._raises(call, r)]
            if culprits:
                fault.requests = culprits
                raise
        with self._blame(kind, requests):
            return call(requests)

    @staticmethod
    def _raises(call, request: LlmRequest) -> bool:
        try:
            call([request])
            return False
        except Exception:
            return True

    @contextmanager
    def _fails_alone(self, kind: str, request: LlmRequest):
        """A raise inside fails `request` alone."""
        try:
            with self._blame(kind, [request]):
                yield
        except ComponentFault as fault:
            self._fail([request], str(fault))

