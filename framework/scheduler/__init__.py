from framework.scheduler.base import CapacityOutput, CapacityScheduler, KVCacheCapacity, MicroBatchScheduler

__all__ = ["CapacityOutput", "CapacityScheduler", "KVCacheCapacity", "MicroBatchScheduler"]
