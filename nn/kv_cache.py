"""KV-cache parameters and the paged-cache values a layer reads and writes in a graph."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Sequence

from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.types import BufferType, TensorType
from graphir.value import BufferValue, TensorValue


class KVCacheStrategy(enum.Enum):
    PAGED = "paged"


def _pos(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"KVCacheParams: {name} must be a positive int, got {v!r}")
    return v


@dataclass(frozen=True)
class KVCacheParams:
    """Shape of the paged KV cache: blocks [pages, 2, num_layers, page_size, n_kv_heads, head_dim].

    With several devices (tensor parallel) each device caches its own KV heads:
    `n_kv_heads_per_device` of them (KV heads are replicated when the device count does not
    divide n_kv_heads).

    Example:
        >>> p = KVCacheParams(dtype=DType.bfloat16, n_kv_heads=8, head_dim=128, num_layers=32)
        >>> p.blocks_type()
        buffer<[total_num_pages, 2, 32, 128, 8, 128], bf16, cpu:0>
    """

    dtype: DType
    n_kv_heads: int
    head_dim: int
    num_layers: int = 1
    page_size: int = 128
    cache_strategy: KVCacheStrategy = KVCacheStrategy.PAGED
    devices: tuple[DeviceRef, ...] = field(default=(DeviceRef.CPU(),))
    data_parallel_degree: int = 1
    enable_prefix_caching: bool = False

    def __post_init__(self):
        if not isinstance(self.dtype, DType) or not self.dtype.is_float:
            raise ValueError(f"KVCacheParams: dtype must be a float DType, got {self.dtype!r}")
        for name in ("n_kv_heads", "head_dim", "num_layers", "page_size", "data_parallel_degree"):
            _pos(name, getattr(self, name))
        if not isinstance(self.cache_strategy, KVCacheStrategy):
            raise ValueError(f"KVCacheParams: only the paged cache strategy exists, got "
                             f"{self.cache_strategy!r}")
        devs = tuple(self.devices)
        if not devs or not all(isinstance(d, DeviceRef) for d in devs):
            raise ValueError(f"KVCacheParams: devices must be DeviceRefs, got {self.devices!r}")
        object.__setattr__(self, "devices", devs)

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    @property
    def n_kv_heads_per_device(self) -> int:
        tp = self.n_devices // self.data_parallel_degree
        if self.n_kv_heads % tp == 0:
            return self.n_kv_heads // tp
        return 1  # tp is a multiple of n_kv_heads: each device holds one (replicated) KV head

    def copy(self, **changes) -> "KVCacheParams":
        return replace(self, **changes)

    def blocks_type(self, device: DeviceRef | None = None, pages="total_num_pages",
                    n_kv_heads: int | None = None) -> BufferType:
        """The buffer type of the blocks on one device."""
        nkv = self.n_kv_heads_per_device if n_kv_heads is None else n_kv_heads
        return BufferType(self.dtype, [pages, 2, self.num_layers, self.page_size, nkv,
                                       self.head_dim], device or self.devices[0])

    def input_types(self, device: DeviceRef | None = None, suffix: str = "",
                    n_kv_heads: int | None = None) -> list:
        """Graph input types [blocks, cache_lengths, lookup_table, max_lengths]; `suffix` keeps
        the symbolic dims of several devices apart."""
        dev = device or self.devices[0]
        u32 = DType.uint32
        return [self.blocks_type(dev, "total_num_pages" + suffix, n_kv_heads),
                TensorType(u32, ["batch" + suffix], dev),
                TensorType(u32, ["batch" + suffix, "max_num_pages" + suffix], dev),
                TensorType(u32, ["steps_remaining" + suffix, 2], DeviceRef.CPU())]


@dataclass(frozen=True)
class PagedCacheValues:
    """The paged cache as graph values: kv_blocks [pages, 2, L, page_size, NKV, D] (a buffer),
    cache_lengths u32 [batch], lookup_table u32 [batch, max_pages], max_lengths u32 [steps, 2]."""

    kv_blocks: BufferValue
    cache_lengths: TensorValue
    lookup_table: TensorValue
    max_lengths: TensorValue | None = None

    def __post_init__(self):
        if not isinstance(self.kv_blocks, BufferValue):
            raise ValueError(f"PagedCacheValues: kv_blocks must be a BufferValue, got "
                             f"{self.kv_blocks!r}")
        for name in ("cache_lengths", "lookup_table"):
            if not isinstance(getattr(self, name), TensorValue):
                raise ValueError(f"PagedCacheValues: {name} must be a TensorValue, got "
                                 f"{getattr(self, name)!r}")

    @staticmethod
    def from_values(values: Sequence) -> "PagedCacheValues":
        """From [blocks, cache_lengths, lookup_table(, max_lengths)] (e.g. graph inputs)."""
        return PagedCacheValues(*values)
