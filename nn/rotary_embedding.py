"""RotaryEmbedding: the RoPE frequency table, built in the graph from ops.

The table is [2 * max_seq_len, head_dim]: row p = [cos(p f0), sin(p f0), cos(p f1), ...] with
inv_freq f_i = 1 / theta ** (2i / head_dim) computed in float64 then rounded to float32 (and
Llama-3 or linearly scaled when asked). Only the head_dim/2 frequencies are a constant;
positions, angles, cos and sin are ops, so the IR stays small and the compiler sees the
computation. LongRoPERotaryEmbedding (Phi-3) stitches two such tables at original_max_position.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.graph import Graph
from graphir.value import TensorValue
from graphir.ops import rope_math as rm

from .module import Module


@dataclass(frozen=True)
class Llama3RopeScalingParams:
    """Llama-3.1 frequency scaling (HF rope_scaling with rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    orig_max_position: int

    def _math(self) -> rm.Llama3RopeScaling:
        return rm.Llama3RopeScaling(self.factor, self.low_freq_factor, self.high_freq_factor,
                                    self.orig_max_position)


@dataclass(frozen=True)
class LinearScalingParams:
    """Position interpolation (HF rope_type "linear"): every frequency divided by `factor`."""

    factor: float

    def __post_init__(self):
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) \
                or not self.factor > 0:
            raise ValueError(f"LinearScalingParams: factor must be > 0, got {self.factor!r}")

    def _math(self) -> rm.LinearRopeScaling:
        return rm.LinearRopeScaling(float(self.factor))


@dataclass(frozen=True)
class LongRoPEScalingParams:
    """LongRoPE (Phi-3, HF rope_type "longrope"): per-frequency divisors `short_factor` below
    `original_max_position` and `long_factor` from there on. cos and sin are multiplied by
    `attention_factor`, by default sqrt(1 + ln(s) / ln(original_max_position)) with
    s = max_position_embeddings / original_max_position (1 when s <= 1), as HF computes it.

    Example:
        >>> p = LongRoPEScalingParams([1.0] * 48, [4.0] * 48, 4096, 131072)
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position: int
    max_position_embeddings: int
    attention_factor: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "short_factor", tuple(float(f) for f in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(f) for f in self.long_factor))
        for name in ("original_max_position", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"LongRoPEScalingParams: {name} must be a positive int, got {v!r}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"LongRoPEScalingParams: attention_factor must be > 0, got "
                             f"{self.attention_factor!r}")

    @property
    def scale_attention_factor(self) -> float:
        """The factor on the table's cos and sin."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        s = self.max_position_embeddings / self.original_max_position
        return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(self.original_max_position))

    def _math(self) -> rm.LongRopeScaling:
        return rm.LongRopeScaling(self.short_factor, self.long_factor,
                                  int(self.original_max_position), self.scale_attention_factor)


_SCALING_PARAMS = (Llama3RopeScalingParams, LinearScalingParams)


def _pos(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"RotaryEmbedding: {name} must be a positive int, got {v!r}")
    return int(v)


class RotaryEmbedding(Module):
    """RoPE for heads of `head_dim` (default dim // n_heads); `interleaved=True` pairs
    (x[2i], x[2i+1]), False pairs (x[i], x[i + head_dim/2]) as Hugging Face Llama does.

    Example:
        >>> rope = RotaryEmbedding(4096, 32, 500000.0, 8192, interleaved=False,
        ...                        scaling_params=Llama3RopeScalingParams(8.0, 1.0, 4.0, 8192))
        >>> freqs = rope.freqs_cis  # inside a Graph: [16384, 128] f32
    """

    def __init__(self, dim: int, n_heads: int, theta: float, max_seq_len: int,
                 head_dim: int | None = None, _freqs_cis=None, interleaved: bool = True,
                 *, scaling_params: Llama3RopeScalingParams | LinearScalingParams | None = None,
                 device: DeviceRef | None = None) -> None:
        super().__init__()
        self.dim, self.n_heads = _pos("dim", dim), _pos("n_heads", n_heads)
        self.max_seq_len = _pos("max_seq_len", max_seq_len)
        self.head_dim = _pos("head_dim", dim // n_heads if head_dim is None else head_dim)
        if self.head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {self.head_dim}")
        if isinstance(theta, bool) or not isinstance(theta, (int, float, np.number)) \
                or not math.isfinite(theta) or not theta > 0:
            raise ValueError(f"RotaryEmbedding: theta must be a finite number > 0, got {theta!r}")
        if scaling_params is not None and not isinstance(scaling_params, _SCALING_PARAMS):
            raise ValueError(f"RotaryEmbedding: scaling_params must be Llama3RopeScalingParams or "
                             f"LinearScalingParams, got {type(scaling_params).__name__}")
        self.theta = float(theta)
        self.interleaved = bool(interleaved)
        self.scaling_params = scaling_params
        self.device = device or DeviceRef.CPU()
        self._given = None
        if _freqs_cis is not None:
            given = np.asarray(_freqs_cis, dtype=np.float32)
            if given.ndim != 2 or given.shape[1] != self.head_dim:
                raise ValueError(f"RotaryEmbedding: _freqs_cis must be [positions, "
                                 f"{self.head_dim}], got {list(given.shape)}")
            self._given = given
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def compute_inv_freqs(self) -> np.ndarray:
        """inv_freq [head_dim / 2] float32 (scaled when scaling_params are set)."""
        scaling = None if self.scaling_params is None else self.scaling_params._math()
        return rm.rope_inv_freq(self.head_dim, self.theta, scaling)

    def freqs_cis_base(self) -> TensorValue:
        """A fresh table [2 * max_seq_len, head_dim] f32 built with ops in the current graph."""
        dev = self.device
        if self._given is not None:
            return ops.constant(self._given, DType.float32, dev)
        return self._table(0, 2 * self.max_seq_len, self.compute_inv_freqs())

    def _table(self, start: int, stop: int, inv_freqs) -> TensorValue:
        """Rows [start, stop) of the table for the given frequencies, built with ops."""
        dev, n, half = self.device, stop - start, self.head_dim // 2
        inv = ops.constant(np.asarray(inv_freqs, np.float32).reshape(1, half), DType.float32, dev)
        t = ops.range(start, stop, 1, dtype=DType.float32, device=dev).reshape([n, 1])
        ang = t * inv  # a float32 product, as the table's definition says
        cos = ops.cos(ang).reshape([n, half, 1])
        sin = ops.sin(ang).reshape([n, half, 1])
        return ops.concat([cos, sin], axis=2).reshape([n, self.head_dim])

    @property
    def freqs_cis(self) -> TensorValue:
        """The table in the current graph (built once per graph)."""
        g = Graph.current()
        if g not in self._cache:
            self._cache[g] = self.freqs_cis_base()
        return self._cache[g]

    def __call__(self, x, input_row_offsets, cache_lengths) -> TensorValue:
        """RoPE of a ragged x [T, H * head_dim] at positions cache_length + row in sequence."""
        return ops.rope(x, self.freqs_cis, input_row_offsets, cache_lengths,
                        head_dim=self.head_dim, interleaved=self.interleaved)


class Llama3RotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding with Llama-3 frequency scaling (MAX's `Llama3RotaryEmbedding`)."""

    def __init__(self, dim: int, n_heads: int, theta: float, max_seq_len: int,
                 head_dim: int | None = None, _freqs_cis=None, interleaved: bool = True,
                 scaling_params: Llama3RopeScalingParams | None = None,
                 device: DeviceRef | None = None) -> None:
        super().__init__(dim, n_heads, theta, max_seq_len, head_dim, _freqs_cis, interleaved,
                         scaling_params=scaling_params, device=device)


class LongRoPERotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding with LongRoPE scaling (Phi-3, MAX's `LongRoPERotaryEmbedding`): one
    stitched table whose rows below `original_max_position` use the short factors and the rest
    the long ones, cos and sin times the attention factor.

    Hugging Face picks one set for a whole forward pass (long once any position in it reaches
    `original_max_position`); the two agree whenever no single step holds positions on both
    sides of `original_max_position` (decode steps always qualify).

    Example:
        >>> rope = LongRoPERotaryEmbedding(3072, 32, 10000.0, 131072, interleaved=False,
        ...     scaling_params=LongRoPEScalingParams([1.0] * 48, [4.0] * 48, 4096, 131072))
    """

    def __init__(self, dim: int, n_heads: int, theta: float, max_seq_len: int,
                 head_dim: int | None = None, _freqs_cis=None, interleaved: bool = True,
                 scaling_params: LongRoPEScalingParams | None = None,
                 device: DeviceRef | None = None) -> None:
        super().__init__(dim, n_heads, theta, max_seq_len, head_dim, _freqs_cis, interleaved,
                         device=device)
        if scaling_params is not None and not isinstance(scaling_params, LongRoPEScalingParams):
            raise ValueError(f"LongRoPERotaryEmbedding: scaling_params must be "
                             f"LongRoPEScalingParams, got {type(scaling_params).__name__}")
        self.longrope_params = scaling_params
        if scaling_params is not None:
            rm.longrope_inv_freqs(self.head_dim, self.theta, scaling_params._math())  # validates

    def compute_inv_freqs(self) -> np.ndarray:
        """The short inv_freq [head_dim / 2] (positions below original_max_position)."""
        if self.longrope_params is None:
            return super().compute_inv_freqs()
        return rm.longrope_inv_freqs(self.head_dim, self.theta, self.longrope_params._math())[0]

    def freqs_cis_base(self) -> TensorValue:
        p = self.longrope_params
        if self._given is not None or p is None:
            return super().freqs_cis_base()
        short, long = rm.longrope_inv_freqs(self.head_dim, self.theta, p._math())
        n, split = 2 * self.max_seq_len, min(p.original_max_position, 2 * self.max_seq_len)
        parts = [self._table(0, split, short)]
        if split < n:
            parts.append(self._table(split, n, long))
        table = parts[0] if len(parts) == 1 else ops.concat(parts, axis=0)
        mag = p.scale_attention_factor
        if mag == 1.0:
            return table
        return table * ops.constant(np.float32(mag), DType.float32, self.device)
