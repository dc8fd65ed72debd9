"""constant, range and transfer_to."""
from __future__ import annotations

import numpy as np

from graphir.device import DeviceRef
from graphir.dim import Dim
from graphir.dtype import DType
from graphir.graph import Graph
from graphir.opdef import OpDef, register
from graphir.types import TensorType

from . import _rules as R
from ._build import apply, tensors


def constant(value, dtype: DType, device: DeviceRef | None = None):
    """A constant tensor (value rounded to dtype). Example: `ops.constant(1.0, DType.float32)`."""
    if not isinstance(dtype, DType):
        raise TypeError(f"constant needs a DType, got {dtype!r}")
    return Graph.current().constant(value, dtype, device or DeviceRef.CPU())


def _range_rule(ins, attrs):
    if ins:
        raise ValueError("range takes no operands")
    start, stop, step = attrs["start"], attrs.get("stop"), attrs["step"]
    for name, v in (("start", start), ("stop", stop), ("step", step)):
        if v is None and name == "stop":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not np.isfinite(v):
            raise ValueError(f"range {name} must be a finite number, got {v!r}")
    if not isinstance(attrs["dtype"], DType):
        raise TypeError(f"range dtype must be a DType, got {attrs['dtype']!r}")
    if step == 0:
        raise ValueError("range step must not be 0")
    n = attrs.get("out_dim")
    if n is None:
        if stop is None:
            raise ValueError("range needs a stop or an out_dim")
        n = max(0, int(np.ceil((stop - start) / step)))
        if n > 2**40:
            raise ValueError(f"range of {n} elements is too large")
    return [TensorType(attrs["dtype"], [n], attrs["device"])]


def _range_ref(ins, a):
    n = a["_out_shapes"][0][0]
    return [a["start"] + a["step"] * np.arange(n, dtype=np.float64)]


register(OpDef("range", _range_rule, _range_ref,
               attr_names=("start", "stop", "step", "out_dim", "dtype", "device")))


def range(start, stop, step=1, out_dim=None, *, dtype: DType = DType.float32,
          device: DeviceRef | None = None):
    """[start, start+step, ...) below stop; out_dim gives a symbolic length when stop is symbolic.

    Example:
        >>> pos = ops.range(0, 16, 1, dtype=DType.int64)
    """
    if isinstance(stop, Dim) and not stop.is_static:
        if out_dim is None:
            out_dim = stop
        stop = None
    return apply("range", [], start=start, stop=stop, step=step,
                 out_dim=None if out_dim is None else Dim(out_dim), dtype=dtype,
                 device=DeviceRef.coerce(device) if device is not None else DeviceRef.CPU())


def _transfer_rule(ins, attrs):
    (t,) = ins
    R.tensor(t)
    if not isinstance(attrs.get("device"), DeviceRef):
        raise ValueError(f"transfer_to needs a DeviceRef, got {attrs.get('device')!r}")
    return [R.like(t, device=attrs["device"])]


register(OpDef("transfer_to", _transfer_rule, lambda ins, a: [np.array(ins[0], copy=True)],
               attr_names=("device",)))


def transfer_to(x, device: DeviceRef):
    """x on another device (a copy)."""
    (x,) = tensors(x)
    # "gpu:1" is accepted as DeviceRef.GPU(1); anything else not a DeviceRef is refused by the rule.
    return apply("transfer_to", [x], device=DeviceRef.coerce(device) if isinstance(device, str)
                 else device)
