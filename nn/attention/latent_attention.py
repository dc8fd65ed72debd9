"""LatentAttentionWithRope: DeepSeek's multi-head latent attention (MLA) over a latent paged cache.

Per token the layer projects x to q (directly, or through the q LoRA: q_a_proj, RMSNorm,
q_b_proj) and to the compressed kv_a output ``[c_kv | k_pe]``; the cache stores the RMS-normed
c_kv and the roped k_pe as one 576-wide "head" (kv_lora_rank + qk_rope_head_dim). Attention then
runs either decompressed (prefill: K nope and V per head from kv_b_proj, `buffer_size` tokens at
a time, laid out by create_mla_prefill_metadata) or absorbed (decode: in latent space);
graph_mode picks one, or "auto" emits ops.mla_attention, which computes only the form each
batch takes (decode while every sequence brings one new token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.value import TensorValue, as_tensor
from graphir.ops.attention import layer_index

from ..float8_config import Float8Config
from ..kv_cache import KVCacheParams, PagedCacheValues
from ..linear import Linear
from ..norm import RMSNorm
from ..rotary_embedding import RotaryEmbedding
from ..sharding import ShardingStrategy, replace_weights
from .checks import as_cache, check_devices, check_rope_and_kv_params, check_x, real_number
from .checks import positive_int as _pos
from .latent_sharding import mla_slicer
from .sharded import ShardableAttention

GRAPH_MODES = ("prefill", "decode", "auto")
_NORM_EPS = 1e-6  # DeepSeek's q_a / kv_a layernorms always use 1e-6


@dataclass(frozen=True)
class MLAPrefillMetadata:
    """Where each sequence's decompressed K/V rows sit in the prefill buffer (ops.mla_prefill_plan)."""

    buffer_row_offsets: TensorValue
    cache_offsets: TensorValue
    buffer_lengths: TensorValue


class LatentAttentionWithRope(ShardableAttention):
    """Multi-head latent attention with RoPE (MAX's class), DeepSeek-V2/V3 style.

    Weights (HF / MAX names): q_proj.weight [NH*(nope+rope), hidden], or q_a_proj.weight
    [q_lora_rank, hidden], q_a_layernorm.weight, q_b_proj.weight; kv_a_proj_with_mqa.weight
    [kv_lora_rank + rope, hidden], kv_a_layernorm.weight, kv_b_proj.weight
    [NH*(nope+v), kv_lora_rank], o_proj.weight [hidden, NH*v].

    The cache must hold one head of kv_lora_rank + qk_rope_head_dim. The default scale is
    1/sqrt(nope + rope), times ``rope.attention_mscale ** 2`` for a DeepSeek YaRN rope.

    Example:
        >>> kvp = KVCacheParams(dtype=DType.bfloat16, n_kv_heads=1, head_dim=576)
        >>> attn = LatentAttentionWithRope(rope=rope, num_attention_heads=16,
        ...     num_key_value_heads=16, hidden_size=2048, kv_params=kvp, dtype=DType.bfloat16)
        >>> out = attn(0, x, PagedCacheValues(blocks, clen, lut, maxl), rope.freqs_cis, offs)
    """

    def __init__(self, *, rope: RotaryEmbedding, num_attention_heads: int,
                 num_key_value_heads: int, hidden_size: int, kv_params: KVCacheParams,
                 dtype: DType, devices: Sequence[DeviceRef] | None = None,
                 linear_cls: Callable[..., Linear] = Linear, o_proj_dtype: DType | None = None,
                 o_proj_quant_config=None, scale: float | None = None,
                 q_lora_rank: int | None = None, kv_lora_rank: int = 512,
                 qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64, v_head_dim: int = 128,
                 buffer_size: int = 16384, graph_mode: str | None = None,
                 norm_dtype: DType | None = None) -> None:
        super().__init__()
        cls = type(self).__name__
        check_rope_and_kv_params(cls, rope, kv_params)
        for name, dt in (("dtype", dtype), ("o_proj_dtype", o_proj_dtype),
                         ("norm_dtype", norm_dtype)):
            if dt is not None and (not isinstance(dt, DType) or not dt.is_float):
                raise ValueError(f"{cls}: {name} must be a float DType, got {dt!r}")
        if dtype is None:
            raise ValueError(f"{cls}: dtype is required")
        self.n_heads = self.num_heads = _pos(cls, "num_attention_heads", num_attention_heads)
        self.num_key_value_heads = _pos(cls, "num_key_value_heads", num_key_value_heads)
        self.hidden_size = _pos(cls, "hidden_size", hidden_size)
        if q_lora_rank is not None:
            _pos(cls, "q_lora_rank", q_lora_rank)
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = _pos(cls, "kv_lora_rank", kv_lora_rank)
        self.qk_nope_head_dim = _pos(cls, "qk_nope_head_dim", qk_nope_head_dim)
        self.qk_rope_head_dim = _pos(cls, "qk_rope_head_dim", qk_rope_head_dim)
        self.v_head_dim = _pos(cls, "v_head_dim", v_head_dim)
        self.buffer_size = _pos(cls, "buffer_size", buffer_size)
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.cache_head_dim = kv_lora_rank + qk_rope_head_dim
        if rope.head_dim != qk_rope_head_dim:
            raise ValueError(f"{cls}: rope.head_dim {rope.head_dim} differs from "
                             f"qk_rope_head_dim {qk_rope_head_dim}")
        if kv_params.n_kv_heads != 1 or kv_params.head_dim != self.cache_head_dim:
            raise ValueError(f"{cls}: the latent cache holds one head of kv_lora_rank + "
                             f"qk_rope_head_dim = {kv_lora_rank} + {qk_rope_head_dim} = "
                             f"{self.cache_head_dim}; kv_params has n_kv_heads "
                             f"{kv_params.n_kv_heads}, head_dim {kv_params.head_dim}")
        mode = "auto" if graph_mode is None else graph_mode
        if mode not in GRAPH_MODES:
            raise ValueError(f"{cls}: graph_mode must be one of {GRAPH_MODES} or None, got "
                             f"{graph_mode!r}")
        if o_proj_quant_config is not None and not isinstance(o_proj_quant_config, Float8Config):
            raise NotImplementedError(f"{cls}: o_proj_quant_config {type(o_proj_quant_config).__name__}"
                                      f" is not supported (only None or a Float8Config)")
        self.graph_mode = mode
        self.rope, self.kv_params = rope, kv_params
        self.devices = check_devices(cls, devices)
        self.dtype, self.linear_cls = dtype, linear_cls
        self.o_proj_dtype = o_proj_dtype or dtype
        self.o_proj_quant_config = o_proj_quant_config
        self.norm_dtype = norm_dtype or dtype
        self._given_scale = real_number(cls, "scale", scale)
        mscale = getattr(rope, "attention_mscale", 1.0)
        self.scale = float(scale) if scale is not None else \
            math.sqrt(1.0 / self.qk_head_dim) * mscale * mscale
        self._sharding_strategy: ShardingStrategy | None = None
        self._build_weights()

    def _build_weights(self) -> None:
        dev, dt, hidden, nh = self.devices[0], self.dtype, self.hidden_size, self.n_heads

        def lin(i, o, dtype=dt, **kw):
            return self.linear_cls(in_dim=i, out_dim=o, dtype=dtype, device=dev, **kw)

        if self.q_lora_rank is None:
            self.q_proj = lin(hidden, nh * self.qk_head_dim)
        else:
            self.q_a_proj = lin(hidden, self.q_lora_rank)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, self.norm_dtype, _NORM_EPS, device=dev)
            self.q_b_proj = lin(self.q_lora_rank, nh * self.qk_head_dim)
        self.kv_a_proj_with_mqa = lin(hidden, self.cache_head_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, self.norm_dtype, _NORM_EPS, device=dev)
        self.kv_b_proj = lin(self.kv_lora_rank, nh * (self.qk_nope_head_dim + self.v_head_dim))
        extra = {} if self.o_proj_quant_config is None else \
            {"float8_config": self.o_proj_quant_config}
        self.o_proj = lin(nh * self.v_head_dim, hidden, self.o_proj_dtype, **extra)

    # -- MAX properties ----------------------------------------------------------------------
    def _kv_b_heads(self) -> tuple[TensorValue, TensorValue]:
        """kv_b_proj.weight split per head: (nope rows [NH, nope, R], v rows [NH, v, R])."""
        w = as_tensor(self.kv_b_proj.weight)
        nh, nope, v, r = self.n_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        k, vv = ops.split(w.reshape([nh, nope + v, r]), [nope, v], axis=1)
        return k, vv

    @property
    def w_k(self) -> TensorValue:
        """Prefill K-projection weights [NH*qk_nope_head_dim, kv_lora_rank]."""
        return self._kv_b_heads()[0].reshape([self.n_heads * self.qk_nope_head_dim,
                                              self.kv_lora_rank])

    @property
    def w_uk(self) -> TensorValue:
        """Decode K-projection weights [NH, qk_nope_head_dim, kv_lora_rank]."""
        return self._kv_b_heads()[0]

    @property
    def w_uv(self) -> TensorValue:
        """Decode V-projection weights [NH, kv_lora_rank, v_head_dim]."""
        return ops.transpose(self._kv_b_heads()[1], 1, 2)

    @property
    def wqkv(self) -> TensorValue:
        """q_a_proj (or q_proj without q_lora_rank) and kv_a_proj_with_mqa weights stacked by rows."""
        q = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        return ops.concat([as_tensor(q.weight), as_tensor(self.kv_a_proj_with_mqa.weight)], axis=0)

    def _check_tensor_parallel(self, num_devices: int) -> None:
        if self.n_heads % num_devices:
            raise ValueError(f"{type(self).__name__}: num_attention_heads {self.n_heads} is not "
                             f"divisible by the {num_devices} devices")

    def shard(self, devices: Sequence[DeviceRef]) -> list["LatentAttentionWithRope"]:
        """One layer per device: heads split (tensor parallel: q / kv_b rows, o_proj columns;
        kv_a and the norms replicated; every device keeps the whole latent cache) or copies."""
        strategy, devices = self._shard_strategy(devices)
        n = 1 if strategy.is_replicate else len(devices)
        nh = self.n_heads // n
        out = []
        for i, dev in enumerate(devices):
            h0 = 0 if strategy.is_replicate else i * nh
            m = self._clone(nh, dev)
            replace_weights(self, m, i, dev, lambda rel, shape, h0=h0: mla_slicer(
                rel, shape, h0, nh, self.qk_head_dim, self.qk_nope_head_dim + self.v_head_dim,
                self.v_head_dim))
            out.append(m)
        return out

    def _clone(self, n_heads: int, dev: DeviceRef) -> "LatentAttentionWithRope":
        return LatentAttentionWithRope(
            rope=self.rope, num_attention_heads=n_heads,
            num_key_value_heads=self.num_key_value_heads, hidden_size=self.hidden_size,
            kv_params=self.kv_params.copy(devices=(dev,), data_parallel_degree=1),
            dtype=self.dtype, devices=[dev], linear_cls=self.linear_cls,
            o_proj_dtype=self.o_proj_dtype, o_proj_quant_config=self.o_proj_quant_config,
            scale=self.scale, q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim, buffer_size=self.buffer_size, graph_mode=self.graph_mode,
            norm_dtype=self.norm_dtype)

    def create_mla_prefill_metadata(self, input_row_offsets, kv_collection) -> MLAPrefillMetadata:
        """The prefill buffer plan of this batch (ops.mla_prefill_plan)."""
        kv = as_cache(kv_collection)
        return MLAPrefillMetadata(*ops.mla_prefill_plan(input_row_offsets, kv.cache_lengths))

    # -- graph building ----------------------------------------------------------------------
    def _norm_weight(self, norm: RMSNorm, dtype: DType) -> TensorValue:
        w = as_tensor(norm.weight)
        return w if w.dtype == dtype else ops.cast(w, dtype)

    def _project(self, x: TensorValue) -> tuple[TensorValue, TensorValue]:
        """(q [T, NH*qk_head_dim], kv_latent [T, kv_lora_rank + rope]) from one stacked matmul."""
        q_width = self.n_heads * self.qk_head_dim if self.q_lora_rank is None else self.q_lora_rank
        fused = ops.matmul(x, self.wqkv, transpose_b=True)
        q, kv = ops.split(fused, [q_width, self.cache_head_dim], axis=1)
        if self.q_lora_rank is not None:
            q = ops.rms_norm(q, self._norm_weight(self.q_a_layernorm, q.dtype), _NORM_EPS)
            q = self.q_b_proj(q)
        return q, kv

    def _rope_q(self, q, freqs_cis, input_row_offsets, cache_lengths) -> TensorValue:
        t, nh, nope, rope = q.shape[0], self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        q_nope, q_rope = ops.split(q.reshape([t, nh, self.qk_head_dim]), [nope, rope], axis=2)
        q_rope = ops.rope(q_rope.reshape([t, nh * rope]), freqs_cis, input_row_offsets,
                          cache_lengths, head_dim=rope, interleaved=self.rope.interleaved)
        q = ops.concat([q_nope, q_rope.reshape([t, nh, rope])], axis=2)
        return q.reshape([t, nh * self.qk_head_dim])

    def _attend(self, layer: int, q, kv: PagedCacheValues, offs) -> TensorValue:
        dims = dict(n_heads=self.n_heads, qk_nope_head_dim=self.qk_nope_head_dim,
                    qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                    kv_lora_rank=self.kv_lora_rank, layer_idx=layer, scale=self.scale)
        meta = (kv.kv_blocks, offs, kv.cache_lengths, kv.lookup_table)
        if self.graph_mode == "decode":
            return ops.mla_decode(q, *meta, self.w_uk, self.w_uv, **dims)
        plan = self.create_mla_prefill_metadata(offs, kv)
        if self.graph_mode == "prefill":
            return ops.mla_prefill(q, *meta, self.w_k, self.w_uv, buffer_size=self.buffer_size,
                                   prefill_metadata=plan, **dims)
        # auto: one op; each call computes only the form its batch takes (absorbed while every
        # sequence brings one new token, decompressed otherwise).
        return ops.mla_attention(q, *meta, self.w_uk, self.w_uv, buffer_size=self.buffer_size,
                                 absorb_max=1, prefill_metadata=plan, **dims)

    def __call__(self, layer_idx, x, kv_collection, freqs_cis, input_row_offsets) -> TensorValue:
        """Attention output [total_seq_len, hidden] for the ragged batch x [total_seq_len, hidden]."""
        cls = type(self).__name__
        layer = layer_index(layer_idx)
        kv = as_cache(kv_collection)
        x = check_x(cls, x, self.hidden_size)
        q, kv_latent = self._project(x)
        clen = kv.cache_lengths
        ops.mla_cache_store(kv_latent, self._norm_weight(self.kv_a_layernorm, kv_latent.dtype),
                            freqs_cis, input_row_offsets, clen, kv.lookup_table, kv.kv_blocks,
                            kv_lora_rank=self.kv_lora_rank,
                            qk_rope_head_dim=self.qk_rope_head_dim, layer_idx=layer,
                            interleaved=self.rope.interleaved, eps=_NORM_EPS)
        q = self._rope_q(q, freqs_cis, input_row_offsets, clen)
        attn = self._attend(layer, q, kv, input_row_offsets)
        if attn.dtype != self.o_proj_dtype:
            attn = ops.cast(attn, self.o_proj_dtype)
        out = self.o_proj(attn)
        return out if out.dtype == x.dtype else ops.cast(out, x.dtype)
