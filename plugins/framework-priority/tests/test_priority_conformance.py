"""The `priority` scheduler, as its entry point registers it, passes framework's conformance check
for capacity schedulers (framework.testing runs it through the real executor), with and without
preemption."""

import framework_priority
from framework.plugins.manager import create_plugin_manager
from framework.testing import conformance_suite
from framework_priority.config import PriorityConfig

REGISTERED = create_plugin_manager(extra_plugins=[framework_priority], autoload=False)["capacity_scheduler"].get("priority")

test_conforms = conformance_suite("capacity_scheduler", REGISTERED.factory, PriorityConfig())
test_conforms_without_preemption = conformance_suite("capacity_scheduler", REGISTERED.factory, PriorityConfig(preempt=False))
