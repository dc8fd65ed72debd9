"""rms_norm and layer_norm over the last axis."""
from __future__ import annotations

import numpy as np

from graphir.opdef import OpDef, register

from . import _rules as R
from ._build import apply, tensors


def _norm_rule(n_params):
    def rule(ins, attrs):
        x = R.tensor(ins[0])
        if not x.dtype.is_float:
            raise ValueError(f"needs a float input, got {x.dtype.short}")
        for p in ins[1:1 + n_params]:
            R.tensor(p)
            if p.rank != 1 or x.rank == 0 or p.shape[0] != x.shape[-1]:
                raise ValueError(f"weight {R.fmt(p.shape)} must be [{x.shape[-1] if x.rank else '?'}] "
                                 f"for input {R.fmt(x.shape)}")
        R.same_device(list(ins[:1 + n_params]))
        if attrs.get("epsilon", 0) < 0:
            raise ValueError(f"epsilon must be >= 0, got {attrs['epsilon']}")
        return [R.like(x)]
    return rule


def _rms_ref(ins, a):
    x, w = ins
    r = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + a["epsilon"])
    return [r * (w + a.get("weight_offset", 0.0))]


def _layer_ref(ins, a):
    x, g, b = ins
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return [(x - mu) / np.sqrt(var + a["epsilon"]) * g + b]


register(OpDef("rms_norm", _norm_rule(1), _rms_ref, attr_names=("epsilon", "weight_offset")))
register(OpDef("layer_norm", _norm_rule(2), _layer_ref, attr_names=("epsilon",)))


def rms_norm(input, weight, epsilon: float, weight_offset: float = 0.0):
    """x * rsqrt(mean(x^2, -1) + epsilon) * (weight + weight_offset).

    Example:
        >>> y = ops.rms_norm(x, w, 1e-6)
    """
    x, w = tensors(input, weight)
    return apply("rms_norm", [x, w], epsilon=float(epsilon),
                 weight_offset=float(weight_offset) or None)


def layer_norm(input, gamma, beta, epsilon: float):
    """(x - mean) / sqrt(var + epsilon) * gamma + beta over the last axis."""
    x, g, b = tensors(input, gamma, beta)
    return apply("layer_norm", [x, g, b], epsilon=float(epsilon))
