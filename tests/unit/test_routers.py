"""The built-in routers, each against what it promises, and their conformance."""

import pytest

from framework.plugins.manager import create_plugin_manager
from framework.router.base import ReplicaLoad
from framework.router.config import PrefixAffinityConfig
from framework.router.least_loaded import LeastLoadedRouter
from framework.router.prefix_affinity import PrefixAffinityRouter
from framework.router.round_robin import RoundRobinRouter
from framework.testing import conformance_suite, make_router


def loads(*requests, kv=None):
    """One ReplicaLoad per entry: its number of running requests (none waiting)."""
    return [ReplicaLoad(i, n, 0, (kv or [0.0] * len(requests))[i]) for i, n in enumerate(requests)]


def test_round_robin_takes_each_replica_in_turn():
    router = make_router(RoundRobinRouter)
    assert [router.route([1, 2], loads(9, 0, 0)) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_loaded_picks_the_emptiest():
    router = make_router(LeastLoadedRouter)
    assert router.route([1], loads(3, 1, 2)) == 1
    waiting = [ReplicaLoad(0, 1, 5, 0.1), ReplicaLoad(1, 2, 0, 0.5)]
    assert router.route([1], waiting) == 1  # running and waiting both count
    assert router.route([1], loads(2, 2, 2, kv=[0.5, 0.2, 0.3])) == 1  # ties: less KV in use
    assert router.route([1], loads(2, 2)) == 0  # then the lowest index


SHARED = list(range(100, 108))  # two blocks of 4


def test_prefix_affinity_keeps_a_shared_prefix_on_one_replica():
    router = make_router(PrefixAffinityRouter, block_size=4)
    first = router.route(SHARED + [1, 2, 3], loads(2, 0, 1))
    assert first == 1  # a new prefix goes to the least loaded replica
    # later requests with the prefix follow it, though another replica is now emptier
    assert router.route(SHARED + [7, 7, 7, 7], loads(2, 3, 1)) == 1
    assert router.route(SHARED[:4] + [5, 5, 5, 5], loads(2, 3, 1)) == 1  # one shared block is enough
    assert router.route([9] * 8, loads(2, 3, 1)) == 2  # an unrelated prompt: the least loaded
    assert router.route([1, 2, 3], loads(4, 3, 0)) == 2  # shorter than a block: nothing to follow


def test_prefix_affinity_moves_a_prefix_off_an_overloaded_replica():
    router = make_router(PrefixAffinityRouter, PrefixAffinityConfig(max_imbalance=2), block_size=4)
    assert router.route(SHARED, loads(0, 1)) == 0
    assert router.route(SHARED, loads(3, 1)) == 0  # 2 more than the emptiest: still allowed
    assert router.route(SHARED, loads(4, 1)) == 1  # 3 more: the prefix moves
    assert router.route(SHARED, loads(0, 1)) == 1  # and stays where it moved


@pytest.mark.parametrize("name", ["round_robin", "least_loaded", "prefix_affinity"])
def test_every_builtin_router_is_registered(name):
    entry = create_plugin_manager(autoload=False)["router"].get(name)
    assert entry.provider == "framework"
    assert make_router(entry.load(), entry.config() if entry.config else None).route([1, 2], loads(0, 0)) in (0, 1)


test_prefix_affinity_conforms = conformance_suite("router", PrefixAffinityRouter, PrefixAffinityConfig())


def test_a_routers_own_settings_are_replay_keys():
    from framework.config import compose
    from framework.replay.runner import build_router

    plugins = create_plugin_manager(autoload=False)
    cfg = compose(["replay.router=prefix_affinity", "replay.max_imbalance=3"], plugins)
    router = build_router(cfg, plugins)
    assert isinstance(router, PrefixAffinityRouter)
    assert (router.max_imbalance, router.block_size) == (3, cfg.kv_cache.block_size)
