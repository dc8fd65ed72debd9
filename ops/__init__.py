"""The op library: one OpDef per op (type rule + float64 numpy reference) and MAX-named builders.

Example:
    >>> from graphir import ops
    >>> with Graph("g", input_types=[TensorType(DType.float32, ["n", 8])]) as g:
    ...     g.output(ops.softmax(g.inputs[0]))
"""
from graphir import core_ops as _core  # noqa: F401

from .creation import constant, range, transfer_to
from .elementwise import (abs, add, cast, clamp, cos, div, equal, exp, floor, gelu, greater,
                          greater_equal, log, logical_and, logical_or, maximum, minimum, mod, mul,
                          neg, not_equal, pow, rsqrt, sigmoid, silu, sin, sqrt, sub, tanh, where)
from .linalg import matmul
from .norms import layer_norm, rms_norm
from .reductions import argmax, max, mean, min, softmax, sum
from .shape import (broadcast_to, concat, gather, permute, reshape, scatter, slice_tensor, split,
                    transpose)
from .attention import (flash_attention_ragged, fused_qkv_matmul, kv_cache_store, rope,
                        rope_split_store)
from .collectives import allgather, allreduce
from .quantized import QuantizationConfig, QuantizationEncoding, dequantize, qmatmul
from . import quant_nib as _quant_nib  # noqa: F401  (nib_repack / nib_matmul: cuda's 4-bit form)
from .mla import mla_attention, mla_cache_store, mla_decode, mla_prefill, mla_prefill_plan


def _named(fn):
    """Builders raise ValueError/TypeError that name the op: a message from deep inside (a dtype
    conversion, an operand check) gets the builder's name in front."""
    import functools

    @functools.wraps(fn)
    def builder(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as e:
            msg = str(e)
            if type(e) not in (ValueError, TypeError) or "gir." in msg \
                    or f"ops.{fn.__name__}" in msg:
                raise
            raise type(e)(f"ops.{fn.__name__}: {msg}") from e
        except (IndexError, KeyError, OverflowError, ZeroDivisionError) as e:
            # An index past a dimension, an infinite size, a zero head count: bad arguments,
            # reported like every other bad argument.
            raise ValueError(f"ops.{fn.__name__}: {type(e).__name__}: {e}") from e
    return builder


def _wrap_builders() -> None:
    import inspect

    ns = globals()
    for name, fn in list(ns.items()):
        if inspect.isfunction(fn) and not name.startswith("_") and \
                fn.__module__.startswith(__name__ + "."):
            ns[name] = _named(fn)


_wrap_builders()
