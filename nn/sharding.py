"""Sharding: how a layer splits over devices, and the per-device weights that result.

A shard is a Weight of its own (graph name "<parent name>[<device index>]") whose data is a slice
of the parent's loaded array, so a parallel layer loads full weights once and its per-device
graphs bind the slices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from graphir.device import DeviceRef
from graphir.weight import Weight

_KINDS = ("replicate", "tensor_parallel")


@dataclass(frozen=True)
class ShardingStrategy:
    """How a module shards: `ShardingStrategy.replicate(n)` or `.tensor_parallel(n)`.

    Example:
        >>> attn.sharding_strategy = ShardingStrategy.tensor_parallel(2)
    """

    kind: str
    num_devices: int

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown sharding kind {self.kind!r}; expected one of {_KINDS}")
        if isinstance(self.num_devices, bool) or not isinstance(self.num_devices, int) \
                or self.num_devices < 1:
            raise ValueError(f"num_devices must be a positive int, got {self.num_devices!r}")

    @staticmethod
    def replicate(num_devices: int) -> "ShardingStrategy":
        return ShardingStrategy("replicate", num_devices)

    @staticmethod
    def tensor_parallel(num_devices: int) -> "ShardingStrategy":
        return ShardingStrategy("tensor_parallel", num_devices)

    @property
    def is_replicate(self) -> bool:
        return self.kind == "replicate"

    @property
    def is_tensor_parallel(self) -> bool:
        return self.kind == "tensor_parallel"


class ShardWeight(Weight):
    """Shard `index` of `parent`: shape given, data `slicer(parent's array)`, on `device`."""

    fixed_name = True  # Module never renames it: the name follows the parent's

    def __init__(self, parent: Weight, index: int, shape, device: DeviceRef,
                 slicer: Callable[[np.ndarray], np.ndarray]):
        self.__dict__.update(parent=parent, index=index, slicer=slicer)
        super().__init__(parent.name, parent.dtype, shape, device,
                         parent.quantization_encoding)

    @property
    def name(self) -> str:
        return f"{self.parent.name}[{self.index}]"

    @name.setter
    def name(self, value) -> None:  # Weight.__init__ assigns it; the parent decides
        pass

    def shard_data(self) -> np.ndarray | None:
        from .module import weight_data

        full = weight_data(self.parent)
        if full is None:
            return None
        out = np.require(self.slicer(full), requirements="C")  # keeps 0-d scales 0-d
        want = tuple(int(d) for d in self.shape)
        if out.shape != want:
            raise ValueError(f"shard {self.name!r}: slice has shape {list(out.shape)}, "
                             f"expected {list(want)}")
        return out


def replace_weights(full, shard, index: int, device: DeviceRef,
                    slicer_for: Callable[[str, tuple], Callable]) -> None:
    """Point every weight of module `shard` at a ShardWeight of the same path in module `full`.

    `slicer_for(relative name, full shape)` picks the slice for each weight.
    """
    full_ws = {rel: w for rel, _, w, _ in full._owned()}
    for rel, attr, w, owner in list(shard._owned()):
        if rel not in full_ws:
            raise ValueError(f"shard has weight {rel!r} that the full module lacks")
        parent = full_ws[rel]
        shape = tuple(int(d) for d in parent.shape)
        sw = ShardWeight(parent, index, w.shape, device, slicer_for(rel, shape))
        setattr(owner, attr, sw)
