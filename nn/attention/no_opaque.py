"""AttentionWithRopeNoOpaque: the cache tensors are explicit call arguments; one qkv_proj."""
from __future__ import annotations

import math
from typing import Callable, Sequence

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.value import TensorValue, as_tensor
from graphir.ops.attention import layer_index

from ..kv_cache import KVCacheParams
from ..linear import Linear
from ..module import Module
from ..rotary_embedding import RotaryEmbedding
from .checks import as_cache, check_devices, check_head_counts, check_x
from .checks import positive_int as _pos
from .mask_config import MHAMaskVariant, as_mask_variant


class AttentionWithRopeNoOpaque(Module):
    """Attention with RoPE whose KV cache is passed as plain graph values (no float8, no
    stacking options, no bias, no clip_qkv). Uses `rope.freqs_cis` itself.

    Weights: qkv_proj.weight [(NH + 2 NKV) * D, hidden], o_proj.weight [hidden, NH * D].

    Example:
        >>> attn = AttentionWithRopeNoOpaque(rope=rope, num_attention_heads=4,
        ...                                  num_key_value_heads=2, hidden_size=64, kv_params=p)
        >>> out = attn(0, x, (blocks, clen, lut, maxl), offs)
    """

    def __init__(self, *, rope: RotaryEmbedding, num_attention_heads: int,
                 num_key_value_heads: int, hidden_size: int, kv_params: KVCacheParams,
                 devices: Sequence[DeviceRef] | None = None, dtype: DType = DType.float32,
                 linear_cls: Callable[..., Linear] = Linear, scale: float | None = None,
                 mask_variant: MHAMaskVariant | str = MHAMaskVariant.CAUSAL_MASK,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        cls = type(self).__name__
        if not isinstance(rope, RotaryEmbedding):
            raise ValueError(f"{cls}: rope must be a RotaryEmbedding, got {type(rope).__name__}")
        nh, nkv, self.hidden_size = check_head_counts(cls, num_attention_heads,
                                                      num_key_value_heads, hidden_size)
        if kv_params.n_kv_heads != nkv or rope.head_dim != kv_params.head_dim:
            raise ValueError(f"{cls}: kv_params (n_kv_heads {kv_params.n_kv_heads}, head_dim "
                             f"{kv_params.head_dim}) must match num_key_value_heads {nkv} and "
                             f"rope.head_dim {rope.head_dim}")
        self.mask_variant = as_mask_variant(mask_variant)
        if self.mask_variant.needs_window:
            _pos(cls, "sliding_window", sliding_window)
        self.sliding_window = sliding_window
        self.rope, self.kv_params = rope, kv_params
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, kv_params.head_dim
        self.devices = check_devices(cls, devices)
        self.scale = float(scale) if scale is not None else math.sqrt(1.0 / self.head_dim)
        d, dev = self.head_dim, self.devices[0]
        self.qkv_proj = linear_cls(in_dim=self.hidden_size, out_dim=(nh + 2 * nkv) * d,
                                   dtype=dtype, device=dev)
        self.o_proj = linear_cls(in_dim=nh * d, out_dim=self.hidden_size, dtype=dtype, device=dev)

    def __call__(self, layer_idx, x, kv_collection, input_row_offsets) -> TensorValue:
        """Output [total_seq_len, hidden]; kv_collection is PagedCacheValues or the tuple
        (kv_blocks, cache_lengths, lookup_table, max_lengths)."""
        layer = layer_index(layer_idx)
        kv = as_cache(kv_collection)
        x = check_x(type(self).__name__, x, self.hidden_size)
        nh, nkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        freqs = self.rope.freqs_cis
        as_tensor(self.o_proj.weight)
        q, k, v = ops.split(self.qkv_proj(x), [nh * d, nkv * d, nkv * d], axis=1)
        blocks, clen, lut = kv.kv_blocks, kv.cache_lengths, kv.lookup_table
        il = self.rope.interleaved
        qr = ops.rope(q, freqs, input_row_offsets, clen, head_dim=d, interleaved=il)
        kr = ops.rope(k, freqs, input_row_offsets, clen, head_dim=d, interleaved=il)
        ops.kv_cache_store(kr, blocks, input_row_offsets, clen, lut, kind=0, layer_idx=layer)
        ops.kv_cache_store(v, blocks, input_row_offsets, clen, lut, kind=1, layer_idx=layer)
        attn = ops.flash_attention_ragged(
            qr, blocks, input_row_offsets, clen, lut, n_heads=nh, n_kv_heads=nkv, head_dim=d,
            layer_idx=layer, mask_variant=self.mask_variant, window=self.sliding_window,
            scale=self.scale)
        return self.o_proj(attn)
