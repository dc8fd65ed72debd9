"""AttentionWithRope: qkv projection, RoPE, paged KV-cache store, ragged flash attention, o_proj.

The rope + split + store step is emitted in one of the two forms of KERNEL_OPS.md, chosen by
`_fuse_rope_and_store`; every weight is materialized up front in a fixed order so that the two
forms differ only in those ops (the fusion pass turns one into the other).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.value import TensorValue, as_tensor
from graphir.weight import Weight
from graphir.ops.attention import layer_index

from ..float8_config import Float8Config, Float8ScaleGranularity
from ..kv_cache import KVCacheParams, PagedCacheValues
from ..linear import Linear, float8_dequantize_weight, float8_quantize_input
from ..norm import RMSNorm
from ..rotary_embedding import RotaryEmbedding
from ..sharding import ShardingStrategy, replace_weights
from .checks import (as_cache, check_devices, check_head_counts, check_rope_and_kv_params,
                     check_x, positive_int, real_number)
from .head_sharding import tp_head_plan, tp_slicer
from .mask_config import MHAMaskVariant, as_mask_variant
from .sharded import ShardableAttention


class AttentionWithRope(ShardableAttention):
    """Attention with rotary position embedding over a paged KV cache (MAX's class).

    Weights (MAX names): q_proj/k_proj/v_proj.weight (and .bias with has_bias) or
    qkv_proj.weight with stacked_qkv; o_proj.weight; q_norm/k_norm.weight with use_qk_norm.
    `softcap` caps the scaled attention scores s to softcap * tanh(s / softcap) (Gemma 2).

    Example:
        >>> attn = AttentionWithRope(rope=rope, num_attention_heads=32, num_key_value_heads=8,
        ...                          hidden_size=4096, kv_params=kv_params)
        >>> attn.load_state_dict(weights)
        >>> out = attn(0, x, PagedCacheValues(blocks, clen, lut, maxl), rope.freqs_cis, offs)
    """

    def __init__(self, *, rope: RotaryEmbedding, sharding_strategy: ShardingStrategy | None = None,
                 num_attention_heads: int, num_key_value_heads: int, hidden_size: int,
                 kv_params: KVCacheParams, devices: Sequence[DeviceRef] | None = None,
                 dtype: DType = DType.float32, linear_cls: Callable[..., Linear] = Linear,
                 stacked_qkv: bool = False, scale: float | None = None, has_bias: bool = False,
                 float8_config: Float8Config | None = None, clip_qkv: float | None = None,
                 use_qk_norm: bool = False, rms_norm_eps: float = 1e-6,
                 mask_variant: MHAMaskVariant | str = MHAMaskVariant.CAUSAL_MASK,
                 sliding_window: int | None = None, softcap: float | None = None,
                 _fuse_rope_and_store: bool = True) -> None:
        super().__init__()
        cls = type(self).__name__
        check_rope_and_kv_params(cls, rope, kv_params)
        nh, nkv, self.hidden_size = check_head_counts(cls, num_attention_heads,
                                                      num_key_value_heads, hidden_size)
        if kv_params.n_kv_heads != nkv:
            raise ValueError(f"{cls}: kv_params.n_kv_heads {kv_params.n_kv_heads} differs from "
                             f"num_key_value_heads {nkv}")
        if rope.head_dim != kv_params.head_dim:
            raise ValueError(f"{cls}: rope.head_dim {rope.head_dim} differs from "
                             f"kv_params.head_dim {kv_params.head_dim}")
        if stacked_qkv and has_bias:
            raise ValueError(f"{cls}: stacked_qkv does not support has_bias")
        if stacked_qkv and float8_config is not None:
            raise ValueError(f"{cls}: stacked_qkv does not support float8_config")
        for name, v in (("clip_qkv", clip_qkv), ("softcap", softcap), ("scale", scale)):
            real_number(cls, name, v)
        real_number(cls, "rms_norm_eps", rms_norm_eps, optional=False)
        if clip_qkv is not None and not clip_qkv > 0:
            raise ValueError(f"{cls}: clip_qkv must be > 0, got {clip_qkv!r}")
        self.mask_variant = as_mask_variant(mask_variant)
        if self.mask_variant.needs_window:
            positive_int(cls, f"sliding_window (needed by {self.mask_variant.name})", sliding_window)
        self.sliding_window = sliding_window
        if softcap is not None and (isinstance(softcap, bool) or not softcap > 0):
            raise ValueError(f"{cls}: softcap must be None or > 0, got {softcap!r}")
        self.softcap = None if softcap is None else float(softcap)
        self.rope = rope
        self.n_heads, self.n_kv_heads = nh, nkv
        self.num_heads = nh
        self.kv_params = kv_params
        self.head_dim = d = kv_params.head_dim
        self.devices = check_devices(cls, devices)
        self.dtype, self.linear_cls = dtype, linear_cls
        self.stacked_qkv, self.has_bias = bool(stacked_qkv), bool(has_bias)
        self.float8_config, self.clip_qkv = float8_config, clip_qkv
        self.use_qk_norm, self.rms_norm_eps = bool(use_qk_norm), float(rms_norm_eps)
        self.scale = float(scale) if scale is not None else math.sqrt(1.0 / d)
        self._fuse_rope_and_store = bool(_fuse_rope_and_store)
        self._sharding_strategy = None
        dev = self.devices[0]
        hidden = self.hidden_size

        def lin(i, o, bias):
            return linear_cls(in_dim=i, out_dim=o, dtype=dtype, device=dev, has_bias=bias,
                              float8_config=float8_config)

        if self.stacked_qkv:
            self.qkv_proj = Weight("qkv_proj.weight", dtype, [(nh + 2 * nkv) * d, hidden], dev)
        else:
            self.q_proj = lin(hidden, nh * d, self.has_bias)
            self.k_proj = lin(hidden, nkv * d, self.has_bias)
            self.v_proj = lin(hidden, nkv * d, self.has_bias)
        self.o_proj = lin(nh * d, hidden, False)
        if self.use_qk_norm:
            self.q_norm = RMSNorm(d, dtype, self.rms_norm_eps, device=dev)
            self.k_norm = RMSNorm(d, dtype, self.rms_norm_eps, device=dev)
        if sharding_strategy is not None:
            self.sharding_strategy = sharding_strategy

    # -- MAX properties ----------------------------------------------------------------------
    def _clip(self, w) -> TensorValue:
        w = as_tensor(w)
        return w if self.clip_qkv is None else ops.clamp(w, -self.clip_qkv, self.clip_qkv)

    @property
    def wqkv(self) -> TensorValue:
        """The concatenation of the q, k and v weights [(NH + 2 NKV) * D, hidden]."""
        if self.stacked_qkv:
            return self._clip(self.qkv_proj)
        return ops.concat([self._clip(p.weight) for p in (self.q_proj, self.k_proj, self.v_proj)],
                          axis=0)

    @property
    def wqkv_bias(self) -> TensorValue | None:
        """The concatenation of the q, k and v biases, or None without has_bias."""
        if not self.has_bias:
            return None
        return ops.concat([as_tensor(p.bias) for p in (self.q_proj, self.k_proj, self.v_proj)])

    @property
    def qkv_input_scale(self) -> TensorValue | None:
        """The max of the q, k and v input scales (static float8 only)."""
        if self.float8_config is None or not self.float8_config.is_static:
            return None
        scales = [as_tensor(p.input_scale).reshape([1])
                  for p in (self.q_proj, self.k_proj, self.v_proj)]
        return ops.max(ops.concat(scales), axis=0).reshape([])

    @property
    def qkv_weight_scale(self) -> TensorValue:
        """The max of the q, k and v weight scales (per tensor) or their concatenation (rowwise)."""
        if self.float8_config is None:
            raise ValueError(f"{type(self).__name__}: qkv_weight_scale needs a float8_config")
        scales = [as_tensor(p.weight_scale) for p in (self.q_proj, self.k_proj, self.v_proj)]
        if self._rowwise_weight_scale:
            return ops.concat(scales, axis=0)
        return ops.max(ops.concat([s.reshape([1]) for s in scales]), axis=0).reshape([])

    @property
    def _rowwise_weight_scale(self) -> bool:
        return self.float8_config.weight_scale.granularity is Float8ScaleGranularity.ROWWISE

    def _check_tensor_parallel(self, num_devices: int) -> None:
        tp_head_plan(self.n_heads, self.n_kv_heads, num_devices)  # validates

    def shard(self, devices: Sequence[DeviceRef]) -> list["AttentionWithRope"]:
        """One AttentionWithRope per device whose weights are slices (tensor parallel) or copies
        (replicate) of this module's weights."""
        strategy, devices = self._shard_strategy(devices)
        out = []
        if strategy.is_replicate:
            for i, dev in enumerate(devices):
                m = self._shard_module(self.n_heads, self.n_kv_heads, dev)
                replace_weights(self, m, i, dev, lambda rel, shape: (lambda a: a))
                out.append(m)
            return out
        plan = tp_head_plan(self.n_heads, self.n_kv_heads, len(devices))
        for i, (dev, p) in enumerate(zip(devices, plan)):
            m = self._shard_module(p.nq, p.nk, dev)
            replace_weights(self, m, i, dev,
                            lambda rel, shape, p=p: tp_slicer(rel, shape, p, self.n_heads,
                                                              self.n_kv_heads, self.head_dim))
            out.append(m)
        return out

    def _shard_module(self, nq: int, nk: int, dev: DeviceRef) -> "AttentionWithRope":
        kvp = self.kv_params.copy(n_kv_heads=nk, devices=(dev,), data_parallel_degree=1)
        return AttentionWithRope(
            rope=self.rope, num_attention_heads=nq, num_key_value_heads=nk,
            hidden_size=self.hidden_size, kv_params=kvp, devices=[dev], dtype=self.dtype,
            linear_cls=self.linear_cls, stacked_qkv=self.stacked_qkv, scale=self.scale,
            has_bias=self.has_bias, float8_config=self.float8_config, clip_qkv=self.clip_qkv,
            use_qk_norm=self.use_qk_norm, rms_norm_eps=self.rms_norm_eps,
            mask_variant=self.mask_variant, sliding_window=self.sliding_window,
            softcap=self.softcap, _fuse_rope_and_store=self._fuse_rope_and_store)

    # -- graph building ----------------------------------------------------------------------
    def _weights_in_order(self):
        """Materialize every weight the projection needs, in one order for both forms."""
        wqkv, bias = self.wqkv, self.wqkv_bias
        qn = kn = None
        if self.use_qk_norm:
            qn, kn = as_tensor(self.q_norm.weight), as_tensor(self.k_norm.weight)
        as_tensor(self.o_proj.weight)
        return wqkv, bias, qn, kn

    def _qkv(self, x: TensorValue, wqkv, bias) -> TensorValue:
        cfg = self.float8_config
        if cfg is not None:
            if self._rowwise_weight_scale:
                rows = self.qkv_weight_scale
            else:
                rows = ops.concat([ops.broadcast_to(as_tensor(p.weight_scale).reshape([1, 1]),
                                                    [p.out_dim, 1])
                                   for p in (self.q_proj, self.k_proj, self.v_proj)], axis=0)
            wqkv = float8_dequantize_weight(wqkv, rows, x.dtype)
            x = float8_quantize_input(x, cfg, self.qkv_input_scale)
        return ops.fused_qkv_matmul(x, wqkv, bias)

    def _replace_o_proj(self, linear_cls: Callable[..., Linear], **quant_kwargs) -> None:
        """Rebuild o_proj with a caller's linear class (quantized subclasses: their default
        o_proj is quantized too, since our Linear has no quantized matmul)."""
        if linear_cls is not Linear:
            self.o_proj = linear_cls(in_dim=self.n_heads * self.head_dim,
                                     out_dim=self.hidden_size, dtype=self.dtype,
                                     device=self.devices[0], has_bias=False, **quant_kwargs)

    def _check_x(self, x) -> TensorValue:
        return check_x(type(self).__name__, x, self.hidden_size)

    def _project_rope_store(self, layer: int, x, kv: PagedCacheValues, freqs_cis,
                            input_row_offsets) -> TensorValue:
        """qkv projection, (q/k norm), RoPE and the K/V store; returns the roped q."""
        wqkv, bias, qn, kn = self._weights_in_order()
        qkv = self._qkv(x, wqkv, bias)
        nh, nkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        blocks, clen, lut = kv.kv_blocks, kv.cache_lengths, kv.lookup_table
        interleaved = self.rope.interleaved
        if self._fuse_rope_and_store:
            return ops.rope_split_store(
                qkv, freqs_cis, input_row_offsets, clen, lut, blocks, n_heads=nh,
                n_kv_heads=nkv, head_dim=d, layer_idx=layer, interleaved=interleaved,
                q_norm_weight=qn, k_norm_weight=kn,
                qk_norm_eps=self.rms_norm_eps if self.use_qk_norm else None)
        t = x.shape[0]
        q, k, v = ops.split(qkv, [nh * d, nkv * d, nkv * d], axis=1)
        if self.use_qk_norm:
            q = ops.rms_norm(q.reshape([t, nh, d]), qn, self.rms_norm_eps).reshape([t, nh * d])
            k = ops.rms_norm(k.reshape([t, nkv, d]), kn, self.rms_norm_eps).reshape([t, nkv * d])
        qr = ops.rope(q, freqs_cis, input_row_offsets, clen, head_dim=d, interleaved=interleaved)
        kr = ops.rope(k, freqs_cis, input_row_offsets, clen, head_dim=d, interleaved=interleaved)
        ops.kv_cache_store(kr, blocks, input_row_offsets, clen, lut, kind=0, layer_idx=layer)
        ops.kv_cache_store(v, blocks, input_row_offsets, clen, lut, kind=1, layer_idx=layer)
        return qr

    def __call__(self, layer_idx, x, kv_collection, freqs_cis, input_row_offsets) -> TensorValue:
        """Attention output [total_seq_len, hidden] for the ragged batch x [total_seq_len, hidden]."""
        layer = layer_index(layer_idx)
        kv = as_cache(kv_collection)
        x = self._check_x(x)
        q = self._project_rope_store(layer, x, kv, freqs_cis, input_row_offsets)
        attn = ops.flash_attention_ragged(
            q, kv.kv_blocks, input_row_offsets, kv.cache_lengths, kv.lookup_table,
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
            layer_idx=layer, mask_variant=self.mask_variant, window=self.sliding_window,
            scale=self.scale, softcap=self.softcap)
        return self.o_proj(attn)

    def materialize_kv_from_hidden(self, layer_idx, hiddens, kv_collections, freqs_cis,
                                   input_row_offsets) -> None:
        """Project hidden states to K/V and write them into the paged cache (nothing else)."""
        def one(v):
            return v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v
        kv = kv_collections
        if isinstance(kv, list) and len(kv) == 1:
            kv = kv[0]
        x = self._check_x(one(hiddens))
        self._project_rope_store(layer_index(layer_idx), x, as_cache(kv), one(freqs_cis),
                                 one(input_row_offsets))
