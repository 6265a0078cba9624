"""Resource managers: per-request resources prepared before each forward and released at the end.

The ResourceManager holds BaseResourceManagers in order; prepare and update run in that order and
free runs in reverse. The KV cache manager is the last one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from framework.request import LlmRequest

if TYPE_CHECKING:
    from framework.scheduler.base import Chunk


class BaseResourceManager(ABC):
    def can_admit(self, request: LlmRequest) -> bool:
        """Whether a queued request the capacity scheduler chose may start now. A manager without
        room says no and the request stays queued (it is asked again next step; never failed)."""
        return True

    def admit(self, request: LlmRequest) -> None:
        """The capacity scheduler admitted `request` (new, or resumed after preemption), before the
        micro-batch scheduler sees it; called again before each step while the request catches up
        its prompt. A manager may attach resources it already has for the request here; the KV
        cache manager attaches cached prefix blocks and advances the cursor."""

    @abstractmethod
    def prepare_resources(self, scheduled: list[LlmRequest]) -> None:
        """Before the forward: make room for each request's `num_scheduled_tokens`."""

    @abstractmethod
    def update_resources(self, scheduled: list[LlmRequest]) -> None:
        """After the step: the scheduled tokens are computed (cursors already advanced)."""

    @abstractmethod
    def free_resources(self, request: LlmRequest) -> None:
        """The request finished, failed or was preempted: release all it holds."""

    @abstractmethod
    def get_max_resource_count(self) -> int: ...

    @abstractmethod
    def get_needed_resource_to_completion(self, request: LlmRequest) -> int: ...

    def never_fits(self, request: LlmRequest) -> str | None:
        """Why `request` could never run however long it waited (it needs more than the whole
        resource holds), or None. Asked once, before a request is queued."""
        return None

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix no request holds (say, between benchmark runs); returns how
        many blocks were forgotten. Default: a manager without a prefix cache forgets nothing."""
        return 0

    def defer(self, plan: list[Chunk]) -> list[LlmRequest]:
        """Requests of this step's plan (the micro-batch scheduler's chunks, in batch order) that
        better run next step (the KV cache: prompt chunks that would compute a block an earlier
        request of the batch is computing, so they reuse it instead). The executor schedules the
        step again without them. Default: none."""
        return []


@dataclass(frozen=True)
class KVCacheSpec:
    """What the model needs from a KV cache; given to the KV cache manager by the model engine.
    On the `meta` device the cache tensors hold no memory: the manager keeps its block accounting
    (tables, prefix reuse, eviction) exactly as with real tensors, for an engine that reads none
    (the simulated one)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: Any  # torch.dtype
    device: Any  # torch.device
    max_model_len: int
    # allocate(shape) -> a zero-filled K or V tensor of one layer (the backend's `kv_cache_tensor`,
    # which places it: 2 MB pages for the CPU kernels); None: torch.zeros on `device`
    allocate: Any = None
    memory_bytes: int | None = None  # what `kv_cache.memory_fraction` is a share of; None: the device's total
    sliding_window: int | None = None  # every layer reads only the keys this close to its query (the smallest window); None: some layer reads all

    @property
    def bytes_per_token(self) -> int:
        import torch

        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class KVCacheStats:
    num_blocks: int
    num_free_blocks: int  # allocatable now, cached-but-unreferenced included
    num_used_blocks: int  # referenced by at least one request
    num_cached_blocks: int  # unreferenced, holding a reusable prefix
    prefix_queried_tokens: int
    prefix_hit_tokens: int

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0


class KVCacheManager(BaseResourceManager):
    """The paged KV cache. Schedulers use only the capacity queries (see
    `framework.scheduler.base.KVCacheCapacity`); the model engine uses the block tables and the
    per-layer cache tensors."""

    block_size: int

    # capacity queries (the scheduler's view)
    @property
    @abstractmethod
    def num_free_blocks(self) -> int: ...

    @abstractmethod
    def blocks_needed(self, request: LlmRequest, num_new_tokens: int) -> int: ...

    @abstractmethod
    def num_exclusive_blocks(self, request: LlmRequest) -> int: ...

    # the engine's view
    @abstractmethod
    def get_block_table(self, request: LlmRequest) -> list[int]: ...

    @abstractmethod
    def get_kv_caches(self) -> list[tuple[Any, Any]]:
        """Per layer (K, V), each `[num_kv_heads, num_blocks, block_size, head_dim]` (head-major:
        gathering a request's blocks yields each head's context contiguous, ready for matmuls)."""

    @abstractmethod
    def stats(self) -> KVCacheStats: ...


class ResourceManagerError(RuntimeError):
    """A resource manager raised; `name` is its key in the ResourceManager, the cause is chained."""

    def __init__(self, name: str, cause: Exception):
        super().__init__(f"resource manager {name!r} raised {cause!r}")
        self.name = name


class ResourceManager:
    """An ordered container of resource managers, the KV cache manager last. A manager that raises
    is named by a ResourceManagerError; `free_resources` still frees the request in every other
    manager before raising it."""

    def __init__(self, managers: dict[str, BaseResourceManager]):
        self.managers = dict(managers)

    @property
    def kv_cache_manager(self) -> KVCacheManager:
        return next(m for m in reversed(self.managers.values()) if isinstance(m, KVCacheManager))

    def _answers(self, method: str, *args):
        """Each manager's answer to `method(*args)`, in order; a raise is named (ResourceManagerError)."""
        for name, manager in self.managers.items():
            try:
                yield getattr(manager, method)(*args)
            except Exception as exc:
                raise ResourceManagerError(name, exc) from exc

    def _each(self, method: str, arg) -> None:
        for _ in self._answers(method, arg):
            pass

    def never_fits(self, request: LlmRequest) -> str | None:
        return next((reason for reason in self._answers("never_fits", request) if reason), None)

    def can_admit(self, request: LlmRequest) -> bool:
        return all(self._answers("can_admit", request))

    def defer(self, plan: list[Chunk]) -> list[LlmRequest]:
        deferred = {id(r) for answer in self._answers("defer", plan) for r in answer}
        return [c.request for c in plan if id(c.request) in deferred]

    def admit(self, request: LlmRequest) -> None:
        self._each("admit", request)

    def reset_prefix_cache(self) -> int:
        """Blocks forgotten by every manager's prefix cache (the KV cache's, a draft model's)."""
        return sum(self._answers("reset_prefix_cache"))

    def prepare_resources(self, scheduled: list[LlmRequest]) -> None:
        self._each("prepare_resources", scheduled)

    def update_resources(self, scheduled: list[LlmRequest]) -> None:
        self._each("update_resources", scheduled)

    def free_resources(self, request: LlmRequest) -> None:
        """In reverse order, and on past a manager that raises (the first raise is raised last)."""
        errors = []
        for name, manager in reversed(self.managers.items()):
            try:
                manager.free_resources(request)
            except Exception as exc:
                error = ResourceManagerError(name, exc)
                error.__cause__ = exc
                errors.append(error)
        if errors:
            raise errors[0]
