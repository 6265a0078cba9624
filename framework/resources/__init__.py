from framework.resources.base import BaseResourceManager, KVCacheManager, KVCacheSpec, KVCacheStats, ResourceManager

__all__ = ["BaseResourceManager", "KVCacheManager", "KVCacheSpec", "KVCacheStats", "ResourceManager"]
