"""framework-priority: the `priority` capacity scheduler, registered through framework's hooks.

This module holds only hook implementations and must stay free of torch imports: plugin discovery
(`python -m framework --list-plugins`, `--help`) imports it. The scheduler itself is loaded lazily
from "framework_priority.scheduler:PriorityScheduler" when a config selects it.
"""

from framework.plugins.hookspecs import hookimpl


@hookimpl
def register_capacity_schedulers(register):
    from framework_priority.config import PriorityConfig  # a plain dataclass, no torch

    register("priority", "framework_priority.scheduler:PriorityScheduler", config=PriorityConfig)


@hookimpl
def config_search_path():
    return "pkg://framework_priority.conf"
