"""Value types: tensors (immutable), buffers (mutable, e.g. KV-cache blocks), the chain token."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .device import DeviceRef
from .dim import Dim, DimLike
from .dtype import DType


def _shape(shape: Iterable[DimLike]) -> tuple[Dim, ...]:
    if isinstance(shape, (str, int, Dim)):
        raise TypeError(f"shape must be a sequence of dims, got {shape!r}")
    return tuple(d if isinstance(d, Dim) else Dim(d) for d in shape)


@dataclass(frozen=True, init=False)
class TensorType:
    """The type of an immutable tensor value.

    Example:
        >>> TensorType(DType.float32, ["seq", 64], DeviceRef.CPU())
        tensor<[seq, 64], f32, cpu:0>
    """

    dtype: DType
    shape: tuple[Dim, ...]
    device: DeviceRef

    _kind = "tensor"

    def __init__(self, dtype: DType, shape: Sequence[DimLike], device: DeviceRef | None = None):
        if not isinstance(dtype, DType):
            raise TypeError(f"dtype must be a DType, got {dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", _shape(shape))
        object.__setattr__(self, "device",
                           DeviceRef.coerce(device) if device is not None else DeviceRef.CPU())

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(d.is_static for d in self.shape)

    def static_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.shape)

    def with_(self, dtype: DType | None = None, shape=None, device: DeviceRef | None = None):
        return type(self)(dtype or self.dtype, self.shape if shape is None else shape,
                          device or self.device)

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self._kind}<[{dims}], {self.dtype.short}, {self.device}>"

    __repr__ = __str__


class BufferType(TensorType):
    """The type of a mutable buffer (written in place by chained ops)."""

    _kind = "buffer"


@dataclass(frozen=True)
class ChainType:
    """The side-effect token threaded through ops that touch buffers."""

    def __str__(self) -> str:
        return "!chain"

    __repr__ = __str__


Type = TensorType | BufferType | ChainType
