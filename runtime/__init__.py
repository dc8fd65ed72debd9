"""graphir.runtime: sessions that run artifacts, the paged KV-cache manager, the interpreter."""
from .kv_cache import PagedKVCacheManager
from .session import InferenceSession

__all__ = ["InferenceSession", "PagedKVCacheManager"]
