"""Linear: y = x @ W^T (+ b), optionally with float8_e4m3fn weights and scales."""
from __future__ import annotations

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.value import TensorValue, as_tensor
from graphir.weight import Weight

from .float8_config import FLOAT8_MAX, Float8Config, Float8ScaleGranularity
from .module import Module

_TINY = 1e-12  # floor of a dynamic scale: an all-zero row must not divide by zero


def _dim(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"Linear: {name} must be a positive int, got {v!r}")
    return v


def float8_dequantize_weight(w, weight_scale, dtype: DType) -> TensorValue:
    """float8 weight [out, in] times its scale (scalar or [out, 1]), as `dtype`."""
    s = as_tensor(weight_scale)
    if s.dtype != dtype:
        s = ops.cast(s, dtype)
    return ops.cast(w, dtype) * s


def float8_quantize_input(x: TensorValue, config: Float8Config, input_scale=None) -> TensorValue:
    """x rounded through float8 with a static (given) or per-token (computed) scale, returned
    dequantized in x's dtype: the activations a float8 matmul actually multiplies."""
    if config.is_static:
        if input_scale is None:
            raise ValueError("a static float8 config needs an input_scale")
        s = as_tensor(input_scale)
        if s.dtype != x.dtype:
            s = ops.cast(s, x.dtype)
    else:
        s = ops.max(ops.max(ops.abs(x), axis=-1) / FLOAT8_MAX, _TINY)
    q = ops.cast(ops.clamp(x / s, -FLOAT8_MAX, FLOAT8_MAX), DType.float8_e4m3fn)
    return ops.cast(q, x.dtype) * s


class Linear(Module):
    """A linear layer with weight [out_dim, in_dim] (MAX's `max.nn.Linear`).

    With `float8_config` the weight is float8_e4m3fn with a `weight_scale` (a scalar, or
    [out_dim, 1] for ROWWISE) and, when static, an `input_scale` scalar; `dtype` is then the
    activation, bias and output dtype.

    Example:
        >>> lin = Linear(64, 32, DType.float32, DeviceRef.CPU(), has_bias=True)
        >>> lin.load_state_dict({"weight": w, "bias": b})
        >>> y = lin(x)  # inside a Graph
    """

    def __init__(self, in_dim: int, out_dim: int, dtype: DType, device: DeviceRef | None = None,
                 has_bias: bool = False, quantization_encoding=None,
                 float8_config: Float8Config | None = None, name: str | None = None,
                 clip_weight: float | None = None) -> None:
        super().__init__()
        if not isinstance(dtype, DType):
            raise TypeError(f"Linear: dtype must be a DType, got {dtype!r}")
        self.in_dim, self.out_dim = _dim("in_dim", in_dim), _dim("out_dim", out_dim)
        self.dtype = dtype
        self.device = device or DeviceRef.CPU()
        self.has_bias = bool(has_bias)
        self.float8_config = float8_config
        self.clip_weight = clip_weight
        wdtype = DType.float8_e4m3fn if float8_config is not None else dtype
        prefix = f"{name}." if name else ""
        self.weight = Weight(prefix + "weight", wdtype, [out_dim, in_dim], self.device,
                             quantization_encoding)
        if has_bias:
            self.bias = Weight(prefix + "bias", dtype, [out_dim], self.device)
        if float8_config is not None:
            rowwise = float8_config.weight_scale.granularity is Float8ScaleGranularity.ROWWISE
            self.weight_scale = Weight(prefix + "weight_scale", float8_config.weight_scale.dtype,
                                       [out_dim, 1] if rowwise else [], self.device)
            if float8_config.is_static:
                self.input_scale = Weight(prefix + "input_scale",
                                          float8_config.input_scale.dtype, [], self.device)

    @property
    def input_scale_value(self):
        return self.input_scale if "input_scale" in self._weights else None

    def __call__(self, x) -> TensorValue:
        x = as_tensor(x)
        w = as_tensor(self.weight)
        if self.clip_weight is not None:
            w = ops.clamp(w, -self.clip_weight, self.clip_weight)
        if self.float8_config is not None:
            w = float8_dequantize_weight(w, self.weight_scale, x.dtype)
            x = float8_quantize_input(x, self.float8_config, self.input_scale_value)
        y = ops.matmul(x, w, transpose_b=True)
        if self.has_bias:
            y = y + as_tensor(self.bias)
        return y
