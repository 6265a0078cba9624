"""Registers the built-in routers through the same hook a plugin uses."""

from framework.plugins.hookspecs import hookimpl
from framework.router.config import PrefixAffinityConfig


@hookimpl
def register_routers(register):
    register("round_robin", "framework.router.round_robin:RoundRobinRouter")
    register("least_loaded", "framework.router.least_loaded:LeastLoadedRouter")
    register("prefix_affinity", "framework.router.prefix_affinity:PrefixAffinityRouter", config=PrefixAffinityConfig)
