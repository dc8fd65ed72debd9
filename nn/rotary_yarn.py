"""YaRN rotary embeddings (MAX's `YarnRotaryEmbedding` and `DeepseekYarnRotaryEmbedding`).

YaRN blends each frequency between its original value (fast-rotating dims, extrapolated) and the
value divided by the scaling factor (slow dims, interpolated) along a linear ramp between the
correction dims of `beta_fast` and `beta_slow` rotations (rounded outwards unless
`truncate=False`). The table's cos and sin are multiplied by `attention_factor` when given;
otherwise by ``mscale(factor)`` (generic YaRN) or ``mscale(factor, mscale) / mscale(factor,
mscale_all_dim)`` (DeepSeek). MLA multiplies its softmax scale by ``mscale(factor,
mscale_all_dim) ** 2`` (`attention_mscale` squared), as DeepSeek does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.value import TensorValue
from graphir.ops import rope_math as rm

from .rotary_embedding import RotaryEmbedding


@dataclass(frozen=True)
class DeepseekYarnRopeScalingParams:
    """YaRN parameters with DeepSeek's names (HF rope_parameters of rope_type "yarn").

    Example:
        >>> p = DeepseekYarnRopeScalingParams(40.0, 4096, 32, 1, 1.0, 1.0)
    """

    scaling_factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32
    beta_slow: float = 1
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    attention_factor: float | None = None

    def __post_init__(self):
        _check(self, self.scaling_factor, self.original_max_position_embeddings)

    def _math(self) -> rm.YarnRopeScaling:
        return rm.YarnRopeScaling(factor=float(self.scaling_factor),
                                  original_max_position=int(self.original_max_position_embeddings),
                                  beta_fast=float(self.beta_fast), beta_slow=float(self.beta_slow),
                                  mscale=float(self.mscale),
                                  mscale_all_dim=float(self.mscale_all_dim),
                                  attention_factor=_opt_float(self.attention_factor),
                                  truncate=bool(self.truncate))


@dataclass(frozen=True)
class YarnScalingParams:
    """Generic YaRN parameters (HF rope_type "yarn" outside DeepSeek; MAX's names). The table's
    magnitude is `attention_factor`, by default ``0.1 * ln(factor) + 1``.

    Example:
        >>> p = YarnScalingParams(4.0, 32.0, 1.0, 32768, True)
    """

    factor: float
    beta_fast: float
    beta_slow: float
    original_max_position_embeddings: int
    truncate: bool = True
    attention_factor: float | None = None

    def __post_init__(self):
        _check(self, self.factor, self.original_max_position_embeddings)

    def _math(self) -> rm.YarnRopeScaling:
        return rm.YarnRopeScaling(factor=float(self.factor),
                                  original_max_position=int(self.original_max_position_embeddings),
                                  beta_fast=float(self.beta_fast), beta_slow=float(self.beta_slow),
                                  attention_factor=_opt_float(self.attention_factor),
                                  truncate=bool(self.truncate))


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


def _check(p, factor, orig) -> None:
    if not (factor > 0 and orig > 0 and p.beta_fast > 0 and p.beta_slow > 0):
        raise ValueError(f"{type(p).__name__}: the scaling factor, original_max_position_embeddings, "
                         f"beta_fast and beta_slow must be > 0, got {p}")
    if p.attention_factor is not None and not p.attention_factor > 0:
        raise ValueError(f"{type(p).__name__}: attention_factor must be > 0, got "
                         f"{p.attention_factor!r}")
    if not isinstance(p.truncate, bool):
        raise ValueError(f"{type(p).__name__}: truncate must be a bool, got {p.truncate!r}")


class _YarnTable:
    """The YaRN frequencies and the table magnitude, shared by both YaRN embeddings."""

    def compute_inv_freqs(self) -> np.ndarray:
        """inv_freq [head_dim / 2] float32 with the YaRN blend."""
        scaling = None if self.yarn_params is None else self.yarn_params._math()
        return rm.rope_inv_freq(self.head_dim, self.theta, scaling)

    @property
    def table_mscale(self) -> float:
        """The factor on the table's cos and sin."""
        p = self.yarn_params
        return 1.0 if p is None else rm.rope_table_magnitude(p._math())

    def freqs_cis_base(self) -> TensorValue:
        table = super().freqs_cis_base()
        mag = self.table_mscale
        if self._given is not None or mag == 1.0:
            return table
        return table * ops.constant(np.float32(mag), DType.float32, self.device)


class YarnRotaryEmbedding(_YarnTable, RotaryEmbedding):
    """RotaryEmbedding with generic YaRN frequencies and magnitude (MAX's class).

    Example:
        >>> rope = YarnRotaryEmbedding(4096, 32, 1e6, 131072, interleaved=False,
        ...     scaling_params=YarnScalingParams(4.0, 32.0, 1.0, 32768, True))
    """

    def __init__(self, dim: int, n_heads: int, theta: float, max_seq_len: int,
                 head_dim: int | None = None, _freqs_cis=None, interleaved: bool = True,
                 scaling_params: YarnScalingParams | None = None,
                 device: DeviceRef | None = None) -> None:
        super().__init__(dim, n_heads, theta, max_seq_len, head_dim, _freqs_cis, interleaved,
                         device=device)
        if scaling_params is not None and not isinstance(scaling_params, YarnScalingParams):
            raise ValueError(f"YarnRotaryEmbedding: scaling_params must be YarnScalingParams, "
                             f"got {type(scaling_params).__name__}")
        self.yarn_params = scaling_params


class DeepseekYarnRotaryEmbedding(_YarnTable, RotaryEmbedding):
    """RotaryEmbedding with DeepSeek YaRN frequencies and magnitude (interleaved by default).

    Example:
        >>> rope = DeepseekYarnRotaryEmbedding(64, 1, 10000.0, 4096, head_dim=64,
        ...     scaling_params=DeepseekYarnRopeScalingParams(40.0, 4096, 32, 1, 1.0, 1.0))
        >>> rope.attention_mscale  # MLA's softmax scale is multiplied by its square
        1.3688879454113936
    """

    def __init__(self, dim: int, n_heads: int, theta: float, max_seq_len: int,
                 head_dim: int | None = None, _freqs_cis=None, interleaved: bool = True,
                 scaling_params: DeepseekYarnRopeScalingParams | None = None,
                 device: DeviceRef | None = None) -> None:
        super().__init__(dim, n_heads, theta, max_seq_len, head_dim, _freqs_cis, interleaved,
                         device=device)
        if scaling_params is not None and not isinstance(scaling_params,
                                                         DeepseekYarnRopeScalingParams):
            raise ValueError(f"DeepseekYarnRotaryEmbedding: scaling_params must be "
                             f"DeepseekYarnRopeScalingParams, got {type(scaling_params).__name__}")
        self.yarn_params = scaling_params

    @property
    def attention_mscale(self) -> float:
        """``mscale(factor, mscale_all_dim)``: MLA's softmax scale is multiplied by its square."""
        p = self.yarn_params
        return 1.0 if p is None else rm.yarn_mscale(p.scaling_factor, p.mscale_all_dim)
