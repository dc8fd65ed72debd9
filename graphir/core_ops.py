"""Structural ops the graph itself creates: the chain token, weights and constants."""
from __future__ import annotations

import numpy as np

from .dtype import round_to
from .opdef import OpDef, register
from .types import ChainType, TensorType


def _weight_type(ins, attrs):
    return [TensorType(attrs["dtype"], attrs["shape"], attrs["device"])]


def _constant_type(ins, attrs):
    v = attrs["value"]
    if not isinstance(v, np.ndarray):
        raise ValueError("constant value must be an array")
    return [TensorType(attrs["dtype"], v.shape, attrs["device"])]


def _weight_ref(ins, attrs):
    raise RuntimeError(f"weight {attrs['name']!r} is bound by the runtime, not computed")


register(OpDef("chain", lambda ins, a: [ChainType()], lambda ins, a: [None]))
register(OpDef("weight", _weight_type, _weight_ref, attr_names=("name", "dtype", "shape", "device")))
register(OpDef("constant", _constant_type,
               lambda ins, a: [round_to(a["value"], a["dtype"])],
               attr_names=("value", "dtype", "device")))
