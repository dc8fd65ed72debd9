"""RMSNorm (MAX's `max.nn.RMSNorm`)."""
from __future__ import annotations

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.value import TensorValue
from graphir.weight import Weight

from .module import Module


class RMSNorm(Module):
    """x * rsqrt(mean(x^2, -1) + eps) * (weight + weight_offset), weight [dim].

    Example:
        >>> norm = RMSNorm(128, DType.float32, eps=1e-6)
        >>> y = norm(x)  # inside a Graph, x [..., 128]
    """

    def __init__(self, dim: int, dtype: DType = DType.float32, eps: float = 1e-6,
                 weight_offset: float = 0.0, multiply_before_cast: bool = True,
                 device: DeviceRef | None = None) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"RMSNorm: dim must be a positive int, got {dim!r}")
        if not eps >= 0:
            raise ValueError(f"RMSNorm: eps must be >= 0, got {eps!r}")
        self.dim, self.eps, self.weight_offset = dim, float(eps), float(weight_offset)
        self.multiply_before_cast = multiply_before_cast
        self.weight = Weight("weight", dtype, [dim], device or DeviceRef.CPU())

    def __call__(self, x) -> TensorValue:
        return ops.rms_norm(x, self.weight, self.eps, self.weight_offset)
