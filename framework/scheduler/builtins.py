"""Registers the built-in schedulers through the same hooks a plugin uses."""

from framework.plugins.hookspecs import hookimpl
from framework.scheduler.fair import FairConfig
from framework.scheduler.sjf import SJFConfig


@hookimpl
def register_capacity_schedulers(register):
    register("guaranteed_no_evict", "framework.scheduler.capacity:GuaranteedNoEvictScheduler")
    register("max_utilization", "framework.scheduler.capacity:MaxUtilizationScheduler")
    register("static_batch", "framework.scheduler.capacity:StaticBatchScheduler")
    register("sjf", "framework.scheduler.sjf:ShortestJobFirstScheduler", config=SJFConfig)
    register("fair", "framework.scheduler.fair:FairShareScheduler", config=FairConfig)


@hookimpl
def register_micro_batch_schedulers(register):
    register("fcfs", "framework.scheduler.micro_batch:FCFSMicroBatchScheduler")
    register("equal_progress", "framework.scheduler.micro_batch:EqualProgressMicroBatchScheduler")
