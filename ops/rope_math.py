"""Float64 numpy reference math for rotary position embeddings (RoPE).

The frequency tables of the plain, linear, Llama-3, YaRN and LongRoPE variants (HF's rope_type
names and fields), the YaRN magnitude correction, and RoPE applied to packed rows. The attention
references (attention_math.py) rotate with these; nothing here knows about graphs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Llama3RopeScaling",
    "LinearRopeScaling",
    "YarnRopeScaling",
    "LongRopeScaling",
    "rope_inv_freq",
    "rope_freqs_cis",
    "rope_table_magnitude",
    "longrope_inv_freqs",
    "yarn_mscale",
    "apply_rope",
]


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1 frequency scaling (HF ``rope_type="llama3"``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class LinearRopeScaling:
    """Position interpolation (HF ``rope_type="linear"``): every frequency divided by ``factor``."""

    factor: float


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN (HF ``rope_type="yarn"``); cos/sin times ``attention_factor``, else the mscale ratio.
    ``truncate=False`` keeps the correction range's ends unrounded (HF's ``truncate``)."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class LongRopeScaling:
    """LongRoPE (HF ``rope_type="longrope"``): per-frequency divisors, ``short_factor`` below
    ``original_max_position``, ``long_factor`` from there on; cos/sin times ``attention_factor``."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position: int
    attention_factor: float = 1.0

    def __post_init__(self):  # lists become tuples: the scaling stays hashable
        for name in ("short_factor", "long_factor"):
            object.__setattr__(self, name, tuple(float(f) for f in getattr(self, name)))


_SCALINGS = {"llama3": Llama3RopeScaling, "linear": LinearRopeScaling, "yarn": YarnRopeScaling,
             "longrope": LongRopeScaling}


def _as_scaling(scaling):
    if scaling is None or isinstance(scaling, tuple(_SCALINGS.values())):
        return scaling
    if isinstance(scaling, Mapping):
        kind = scaling.get("rope_type", scaling.get("type"))
        rest = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
        if "original_max_position_embeddings" in rest:
            rest["original_max_position"] = rest.pop("original_max_position_embeddings")
        cls = _SCALINGS.get(kind)
        if cls is None:
            raise ValueError(f"rope scaling: unknown rope_type {kind!r}; expected one of {sorted(_SCALINGS)}")
        try:
            return cls(**rest)
        except TypeError as e:
            raise ValueError(f"rope scaling {kind!r}: bad fields {sorted(rest)}: {e}") from None
    raise ValueError(f"rope scaling must be None, one of {[c.__name__ for c in _SCALINGS.values()]} "
                     f"or a dict, got {type(scaling).__name__}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``).

    MLA's softmax scale becomes ``scale * yarn_mscale(factor, mscale_all_dim) ** 2``.

    >>> round(yarn_mscale(40.0, 1.0), 6)
    1.368888
    """
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(rotations: float, dim: int, theta: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` float32, computed in float64 then rounded.

    >>> rope_inv_freq(4, 10000.0).tolist()
    [1.0, 0.009999999776482582]
    """
    if not isinstance(head_dim, (int, np.integer)) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope: head_dim must be a positive even int, got {head_dim!r}")
    if not theta > 0:
        raise ValueError(f"rope: theta must be > 0, got {theta!r}")
    scaling = _as_scaling(scaling)
    if isinstance(scaling, LongRopeScaling):
        raise ValueError("rope_inv_freq: longrope has two frequency sets (short and long); use "
                         "longrope_inv_freqs or rope_freqs_cis")
    i2 = np.arange(0, head_dim, 2, dtype=np.float64)
    inv = 1.0 / float(theta) ** (i2 / head_dim)
    if isinstance(scaling, LinearRopeScaling):
        if not scaling.factor > 0:
            raise ValueError(f"rope linear scaling: factor must be > 0, got {scaling.factor!r}")
        inv = inv / scaling.factor
    elif isinstance(scaling, Llama3RopeScaling):
        s = scaling
        if not (s.factor > 0 and 0 < s.low_freq_factor < s.high_freq_factor and s.original_max_position > 0):
            raise ValueError(f"rope llama3 scaling: need factor > 0, 0 < low_freq_factor < high_freq_factor, "
                             f"original_max_position > 0; got {s}")
        wavelen = 2 * math.pi / inv
        low_wl = s.original_max_position / s.low_freq_factor
        high_wl = s.original_max_position / s.high_freq_factor
        smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        mid = (1 - smooth) * inv / s.factor + smooth * inv
        inv = np.where(wavelen < high_wl, inv, np.where(wavelen > low_wl, inv / s.factor, mid))
    elif isinstance(scaling, YarnRopeScaling):
        s = scaling
        if not (s.factor > 0 and s.original_max_position > 0 and s.beta_fast > 0 and s.beta_slow > 0):
            raise ValueError(f"rope yarn scaling: factor, original_max_position, beta_fast, beta_slow must be > 0; got {s}")
        low = _yarn_correction_dim(s.beta_fast, head_dim, theta, s.original_max_position)
        high = _yarn_correction_dim(s.beta_slow, head_dim, theta, s.original_max_position)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # the published formula's guard against a zero-width ramp
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        # ramp 0: keep the original (extrapolated) frequency; ramp 1: interpolate by `factor`.
        inv = inv / s.factor * ramp + inv * (1.0 - ramp)
    return inv.astype(np.float32)


def longrope_inv_freqs(head_dim: int, theta: float, scaling) -> tuple[np.ndarray, np.ndarray]:
    """(short, long) inverse frequencies ``[head_dim // 2]`` float32 of a LongRoPE scaling:
    ``1 / (factor_i * theta ** (2i / head_dim))``.

    >>> s, l = longrope_inv_freqs(4, 10000.0, LongRopeScaling((1.0, 2.0), (4.0, 8.0), 8))
    >>> (l / s).tolist()
    [0.25, 0.25]
    """
    s = _as_scaling(scaling)
    if not isinstance(s, LongRopeScaling):
        raise ValueError(f"longrope_inv_freqs needs a LongRopeScaling, got {type(s).__name__}")
    rope_inv_freq(head_dim, theta)  # validates head_dim and theta
    if not (isinstance(s.original_max_position, (int, np.integer)) and s.original_max_position > 0):
        raise ValueError(f"rope longrope scaling: original_max_position must be a positive int, got "
                         f"{s.original_max_position!r}")
    base = 1.0 / float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    for name in ("short_factor", "long_factor"):
        f = np.asarray(getattr(s, name), dtype=np.float64)
        if f.shape != (head_dim // 2,) or not np.all(f > 0):
            raise ValueError(f"rope longrope scaling: {name} must hold head_dim / 2 = {head_dim // 2} "
                             f"positive numbers, got {len(f)}")
    return tuple((base / np.asarray(f, np.float64)).astype(np.float32) for f in (s.short_factor, s.long_factor))


def rope_table_magnitude(scaling) -> float:
    """The factor on the table's cos and sin: YaRN's attention factor (or mscale ratio),
    LongRoPE's attention factor, 1 otherwise."""
    scaling = _as_scaling(scaling)
    if isinstance(scaling, YarnRopeScaling):
        if scaling.attention_factor is not None:
            return float(scaling.attention_factor)
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    if isinstance(scaling, LongRopeScaling):
        return float(scaling.attention_factor)
    return 1.0


def rope_freqs_cis(head_dim: int, max_seq_len: int, theta: float, scaling=None) -> np.ndarray:
    """RoPE table ``[2 * max_seq_len, head_dim]`` float32: row p = ``[cos(p f0), sin(p f0), cos(p f1), ...]``.

    ``scaling``: None, :class:`LinearRopeScaling`, :class:`Llama3RopeScaling`, :class:`YarnRopeScaling`,
    :class:`LongRopeScaling` or an HF-style dict with ``rope_type`` ``"linear"``/``"llama3"``/``"yarn"``/
    ``"longrope"``. YaRN and LongRoPE multiply cos and sin by their attention factor; LongRoPE
    rows below ``original_max_position`` use the short factors, the rest the long ones.

    >>> rope_freqs_cis(4, 2, 10000.0).shape
    (4, 4)
    """
    if not isinstance(max_seq_len, (int, np.integer)) or max_seq_len <= 0:
        raise ValueError(f"rope: max_seq_len must be a positive int, got {max_seq_len!r}")
    scaling = _as_scaling(scaling)
    t = np.arange(2 * max_seq_len, dtype=np.float32)
    if isinstance(scaling, LongRopeScaling):
        short, long = longrope_inv_freqs(head_dim, theta, scaling)
        inv = np.where((t < scaling.original_max_position)[:, None], short[None], long[None])
        ang = (t[:, None] * inv).astype(np.float64)
    else:
        inv = rope_inv_freq(head_dim, theta, scaling)
        # The angle is a float32 product, as in MAX and HF: at large t its rounding shows in cos/sin.
        ang = np.outer(t, inv).astype(np.float64)
    mag = rope_table_magnitude(scaling)
    out = np.empty((t.size, head_dim), dtype=np.float64)
    out[:, 0::2] = np.cos(ang) * mag
    out[:, 1::2] = np.sin(ang) * mag
    return out.astype(np.float32)


def apply_rope(x: np.ndarray, freqs_cis: np.ndarray, positions: np.ndarray, *, interleaved: bool) -> np.ndarray:
    """Rotate ``x [tokens, heads, D]`` by the table rows at ``positions [tokens]``; float64 result.

    ``interleaved=True`` pairs ``(x[2i], x[2i+1])``, False pairs ``(x[i], x[i + D/2])``.

    >>> f = rope_freqs_cis(2, 4, 10000.0)
    >>> apply_rope(np.array([[[1.0, 0.0]]]), f, np.array([0]), interleaved=True).tolist()
    [[[1.0, 0.0]]]
    """
    x = np.asarray(x, dtype=np.float64)
    freqs = np.asarray(freqs_cis, dtype=np.float64)
    pos = np.asarray(positions)
    if x.ndim != 3:
        raise ValueError(f"rope: x must be [tokens, heads, head_dim], got shape {x.shape}")
    d = x.shape[2]
    if freqs.ndim != 2 or freqs.shape[1] != d or d % 2:
        raise ValueError(f"rope: freqs_cis must be [max_positions, {d}] with even head_dim, got {freqs.shape}")
    if pos.shape != (x.shape[0],) or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"rope: positions must be integer [{x.shape[0]}], got {pos.dtype} {pos.shape}")
    if pos.size and (pos.min() < 0 or pos.max() >= freqs.shape[0]):
        raise ValueError(f"rope: positions must lie in [0, {freqs.shape[0]}), got range "
                         f"[{pos.min()}, {pos.max()}]")
    rows = freqs[pos.astype(np.int64)][:, None, :]
    cos, sin = rows[..., 0::2], rows[..., 1::2]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x[..., : d // 2], x[..., d // 2 :]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : d // 2], out[..., d // 2 :] = ra, rb
    return out
