"""Registers the built-in KV cache manager through the same hook a plugin uses."""

from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_kv_cache_managers(register):
    register("paged", "framework.resources.paged_kv_cache:PagedKVCacheManager")
    register("sliding_window", "framework.resources.sliding_window_kv_cache:SlidingWindowKVCacheManager")
