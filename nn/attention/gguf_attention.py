"""GGUFQAttentionWithRope: AttentionWithRope over GGUF-quantized q/k/v/o weights.

Everything after the qkv projection (interleaved RoPE, the paged store, flash attention) is
AttentionWithRope's; only the weights and the projection differ.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.value import TensorValue
from graphir.ops.quant.gguf_blocks import dequantize_gguf
from graphir.ops.quantized import QuantizationEncoding

from ..kv_cache import KVCacheParams
from ..linear import Linear
from ..linear_quant import GGUFQLinear
from ..rotary_embedding import RotaryEmbedding
from .attention_with_rope import AttentionWithRope
from .mask_config import MHAMaskVariant

# llama.cpp's tensor names for one block's attention, by our module names.
GGUF_ATTENTION_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                        "o_proj": "attn_output"}


class GGUFQAttentionWithRope(AttentionWithRope):
    """Attention with GGUF quantized weights (MAX's class).

    Weights: q_proj/k_proj/v_proj/o_proj.weight as GGUF blocks uint8 `[out, row_bytes]` in
    `quantization_encoding` (F32 / F16 / BF16: float weights), biases float32 with has_bias.
    GGUF checkpoints use interleaved RoPE, so `rope.interleaved` must be True.

    Example:
        >>> attn = GGUFQAttentionWithRope(rope=rope, num_attention_heads=32,
        ...     num_key_value_heads=8, hidden_size=4096, kv_params=kv_params,
        ...     dtype=DType.uint8, quantization_encoding=QuantizationEncoding.Q4_K)
        >>> attn.load_from_gguf("model.gguf", layer=0)
    """

    def __init__(self, *, rope: RotaryEmbedding, num_attention_heads: int,
                 num_key_value_heads: int, hidden_size: int, kv_params: KVCacheParams,
                 dtype: DType, quantization_encoding,
                 devices: Sequence[DeviceRef] | None = None,
                 linear_cls: Callable[..., Linear] = Linear, scale: float | None = None,
                 has_bias: bool = False, clip_qkv: float | None = None,
                 mask_variant: MHAMaskVariant | str = MHAMaskVariant.CAUSAL_MASK,
                 _fuse_rope_and_store: bool = True) -> None:
        cls = type(self).__name__
        enc = QuantizationEncoding.parse(quantization_encoding)
        if not enc.is_gguf:
            raise ValueError(f"{cls}: quantization_encoding must be a GGUF encoding, got "
                             f"{enc.value}")
        if not getattr(rope, "interleaved", True):
            raise ValueError(f"{cls}: GGUF weights are laid out for interleaved RoPE; got a "
                             f"rope with interleaved=False")
        if clip_qkv is not None and not enc.is_float:
            raise ValueError(f"{cls}: clip_qkv cannot clamp {enc.value} blocks")
        self.quantization_encoding = enc

        def gguf_linear(**kw):
            return GGUFQLinear(**kw, quantization_encoding=enc)

        super().__init__(rope=rope, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, hidden_size=hidden_size,
                         kv_params=kv_params, devices=devices, dtype=dtype,
                         linear_cls=gguf_linear, scale=scale, has_bias=has_bias,
                         clip_qkv=clip_qkv, mask_variant=mask_variant,
                         _fuse_rope_and_store=_fuse_rope_and_store)
        self._replace_o_proj(linear_cls, quantization_encoding=enc)

    # -- MAX properties ----------------------------------------------------------------------
    @property
    def wqkv(self) -> TensorValue:
        """The q, k and v weights stacked along the output rows: GGUF blocks uint8
        `[(NH + 2 NKV) * D, row_bytes]` (float `[.., hidden]` for a float encoding)."""
        return ops.concat([self._clip(p.weight) for p in (self.q_proj, self.k_proj, self.v_proj)],
                          axis=0)

    def _qkv(self, x: TensorValue, wqkv, bias) -> TensorValue:
        if self.quantization_encoding.is_float:
            w = wqkv if wqkv.dtype == x.dtype else ops.cast(wqkv, x.dtype)
            b = bias if bias is None or bias.dtype == x.dtype else ops.cast(bias, x.dtype)
            return ops.fused_qkv_matmul(x, w, b)
        y = ops.qmatmul(self.quantization_encoding, None, x, wqkv)
        if bias is not None:
            y = y + (bias if bias.dtype == x.dtype else ops.cast(bias, x.dtype))
        return y

    def shard(self, devices):
        raise ValueError(f"{type(self).__name__}: sharding GGUF weights is not supported")

    # -- loading ---------------------------------------------------------------------------------
    def load_from_gguf(self, path: str | os.PathLike[str], layer: int, *,
                       strict: bool = True) -> None:
        """Load `blk.{layer}.attn_{q,k,v,output}.{weight,bias}` from a .gguf file.

        Raises:
            ValueError: a missing tensor, a tensor whose encoding differs from this layer's
                `quantization_encoding` or whose shape differs, corrupt or truncated blocks.
        """
        from ..gguf_loader import load_gguf

        try:
            tensors = load_gguf(path)
        except (ValueError, IndexError, KeyError, EOFError) as e:
            # The gguf reader reports a short file as a failed reshape or read; say what it means.
            raise ValueError(f"{os.fspath(path)}: cannot read the GGUF file (truncated or "
                             f"corrupt?): {e}") from e
        sd = {}
        for ours, theirs in GGUF_ATTENTION_NAMES.items():
            lin = getattr(self, ours)
            for kind in ("weight", "bias") if ours != "o_proj" and self.has_bias else ("weight",):
                name = f"blk.{layer}.{theirs}.{kind}"
                if name not in tensors:
                    raise ValueError(f"{os.fspath(path)}: no tensor {name!r} (for {ours}.{kind})")
                t = tensors[name]
                if kind == "bias":
                    sd[f"{ours}.bias"] = dequantize_gguf(np.asarray(t.data).reshape(1, -1),
                                                         t.encoding, t.shape[-1]).reshape(-1)
                    continue
                want = (lin.out_dim, lin.in_dim)
                if t.shape != want:
                    raise ValueError(f"{name}: shape {list(t.shape)}, the layer expects "
                                     f"{list(want)} for {ours}")
                if t.encoding != self.quantization_encoding.value:
                    raise ValueError(f"{name}: stored as {t.encoding}, the layer's "
                                     f"quantization_encoding is "
                                     f"{self.quantization_encoding.value}")
                sd[f"{ours}.weight"] = t.data
        self.load_state_dict(sd, strict=strict)

    def load_state_dict(self, state_dict, *, strict: bool = True) -> None:
        """Load by relative name (q_proj.weight, ...); GGUF blocks are validated per linear."""
        children = {"q_proj", "k_proj", "v_proj", "o_proj"}
        per: dict[str, dict] = {c: {} for c in children}
        rest = {}
        for k, v in state_dict.items():
            head, _, tail = k.partition(".")
            (per[head] if head in children else rest)[tail if head in children else k] = v
        if strict and rest:
            raise ValueError(f"{type(self).__name__}.load_state_dict: unexpected weights "
                             f"{sorted(rest)}")
        for c in sorted(children):
            getattr(self, c).load_state_dict(per[c], strict=strict)
