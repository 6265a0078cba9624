from framework.scheduler.base import CapacityOutput, CapacityScheduler, Chunk, KVCacheCapacity, MicroBatchScheduler

__all__ = ["CapacityOutput", "CapacityScheduler", "Chunk", "KVCacheCapacity", "MicroBatchScheduler"]
