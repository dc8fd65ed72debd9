"""Float8 configuration: float8_e4m3fn weights with a weight scale, and an input scale that is
either a loaded weight (static) or computed per token from the activations (dynamic)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from graphir.dtype import DType

FLOAT8_MAX = 448.0  # largest finite float8_e4m3fn


class Float8ScaleGranularity(enum.Enum):
    TENSOR = "tensor"    # one scale
    ROWWISE = "rowwise"  # one per output row (weights) or per token (inputs)


class Float8ScaleOrigin(enum.Enum):
    STATIC = "static"    # loaded with the weights
    DYNAMIC = "dynamic"  # computed in the graph


@dataclass(frozen=True)
class Float8WeightScaleSpec:
    granularity: Float8ScaleGranularity = Float8ScaleGranularity.TENSOR
    dtype: DType = DType.float32


@dataclass(frozen=True)
class Float8InputScaleSpec:
    granularity: Float8ScaleGranularity = Float8ScaleGranularity.TENSOR
    origin: Float8ScaleOrigin = Float8ScaleOrigin.STATIC
    dtype: DType = DType.float32


@dataclass(frozen=True)
class Float8Config:
    """Float8 settings of a Linear.

    Example:
        >>> cfg = Float8Config.dynamic()   # per-token input scales, per-row weight scales
        >>> lin = Linear(64, 32, DType.float32, DeviceRef.CPU(), float8_config=cfg)
    """

    input_scale: Float8InputScaleSpec = field(default_factory=Float8InputScaleSpec)
    weight_scale: Float8WeightScaleSpec = field(default_factory=Float8WeightScaleSpec)

    def __post_init__(self):
        ins = self.input_scale
        if ins.origin is Float8ScaleOrigin.STATIC and \
                ins.granularity is not Float8ScaleGranularity.TENSOR:
            raise ValueError("a static float8 input scale must have TENSOR granularity")
        if ins.origin is Float8ScaleOrigin.DYNAMIC and \
                ins.granularity is not Float8ScaleGranularity.ROWWISE:
            raise ValueError("a dynamic float8 input scale must be ROWWISE (per token)")

    @property
    def is_static(self) -> bool:
        return self.input_scale.origin is Float8ScaleOrigin.STATIC

    @property
    def is_dynamic(self) -> bool:
        return self.input_scale.origin is Float8ScaleOrigin.DYNAMIC

    @staticmethod
    def static(weight_granularity=Float8ScaleGranularity.TENSOR) -> "Float8Config":
        """A loaded per-tensor input scale; weight scale per tensor (default) or per row."""
        return Float8Config(Float8InputScaleSpec(), Float8WeightScaleSpec(weight_granularity))

    @staticmethod
    def dynamic(weight_granularity=Float8ScaleGranularity.ROWWISE) -> "Float8Config":
        """Per-token input scales computed from the activations."""
        return Float8Config(
            Float8InputScaleSpec(Float8ScaleGranularity.ROWWISE, Float8ScaleOrigin.DYNAMIC),
            Float8WeightScaleSpec(weight_granularity))
