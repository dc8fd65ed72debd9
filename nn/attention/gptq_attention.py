"""GPTQAttentionWithRope: AttentionWithRope over 4- or 8-bit GPTQ q/k/v/o weights.

The q, k and v projections run as one qmatmul over `wqkv`, the three weights joined the way MAX
joins them: packed codes of q|k|v side by side, then their scales side by side, in one uint8
tensor; q/k/v biases (Qwen2) are added after it. With desc_act the three share q_proj's input permutation (GPTQ orders a layer's
inputs by the activations they see, and q, k and v see the same ones); loading checks that.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.value import TensorValue, as_tensor
from graphir.ops.quantized import QuantizationConfig, QuantizationEncoding

from ..kv_cache import KVCacheParams
from ..linear import Linear
from ..linear_quant import GPTQLinear, load_safetensors
from ..module import weight_data
from ..rotary_embedding import RotaryEmbedding
from .attention_with_rope import AttentionWithRope

_QKV = ("q_proj", "k_proj", "v_proj")


class GPTQAttentionWithRope(AttentionWithRope):
    """Attention with GPTQ-quantized weights (MAX's class).

    Weights per projection (q_proj, k_proj, v_proj, o_proj): GPTQLinear's `weight`, `qzeros`
    (sym=False), `perm_idx` (desc_act); q/k/v `bias` with has_bias. `load_state_dict` /
    `load_safetensors` also take the checkpoint tensors `*.qweight`, `*.qzeros`, `*.scales`,
    `*.g_idx`, `*.bias`.

    Example:
        >>> cfg = QuantizationConfig.from_pretrained("Qwen2.5-0.5B-Instruct-GPTQ-Int8")
        >>> attn = GPTQAttentionWithRope(cfg, rope, 14, 2, 896, kv_params, has_bias=True)
        >>> attn.load_safetensors("model.safetensors", "model.layers.0.self_attn.")
    """

    def __init__(self, quantization_config: QuantizationConfig, rope: RotaryEmbedding,
                 num_attention_heads: int, num_key_value_heads: int, hidden_size: int,
                 kv_params: KVCacheParams, devices: Sequence[DeviceRef] | None = None,
                 dtype: DType = DType.float32, scale: float | None = None,
                 linear_cls: Callable[..., Linear] = Linear, *, has_bias: bool = False,
                 _fuse_rope_and_store: bool = True) -> None:
        if not isinstance(quantization_config, QuantizationConfig):
            raise ValueError(f"{type(self).__name__}: quantization_config must be a "
                             f"QuantizationConfig, got {quantization_config!r}")
        self.quantization_config = cfg = quantization_config

        def gptq_linear(**kw):
            return GPTQLinear(**kw, quantization_config=cfg)

        super().__init__(rope=rope, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, hidden_size=hidden_size,
                         kv_params=kv_params, devices=devices, dtype=dtype,
                         linear_cls=gptq_linear, scale=scale, has_bias=has_bias,
                         _fuse_rope_and_store=_fuse_rope_and_store)
        self._replace_o_proj(linear_cls, quantization_encoding=QuantizationEncoding.GPTQ,
                             quantization_config=cfg)

    # -- MAX properties ----------------------------------------------------------------------
    def _projs(self) -> list[GPTQLinear]:
        return [getattr(self, n) for n in _QKV]

    @property
    def wqkv(self) -> TensorValue:
        """q, k and v weights as one uint8 `[in * bits / 8 + 2 groups, (NH + 2 NKV) * D]`: the
        packed codes of the three side by side, then their scales side by side."""
        n_in, groups = self.hidden_size, self.q_proj.groups
        code_rows = n_in * self.quantization_config.bits // 8
        packed, scales = [], []
        for p in self._projs():
            w = as_tensor(p.weight)
            # Byte rows of an int32 [words, out] array are [words, 4 out]; joining those along
            # the columns joins the int32 arrays, as it does for the f16 scales' [groups, 2 out].
            packed.append(w[:code_rows].reshape([code_rows // 4, 4 * p.out_dim]))
            scales.append(w[code_rows:].reshape([groups, 2 * p.out_dim]))
        width = sum(p.out_dim for p in self._projs())
        return ops.concat([ops.concat(packed, axis=1).reshape([code_rows, width]),
                           ops.concat(scales, axis=1).reshape([2 * groups, width])], axis=0)

    @property
    def wqkv_qzeros(self) -> TensorValue | None:
        """The q, k and v qzeros side by side (sym=False), else None."""
        if self.quantization_config.sym:
            return None
        return ops.concat([as_tensor(p.qzeros) for p in self._projs()], axis=1)

    def _weights_in_order(self):
        wqkv, zeros = self.wqkv, self.wqkv_qzeros
        perm = as_tensor(self.q_proj.perm_idx) if self.quantization_config.desc_act else None
        bias = self.wqkv_bias
        for w in self.o_proj.layer_weights.values():
            as_tensor(w)
        return (wqkv, zeros, perm), bias, None, None

    def _qkv(self, x: TensorValue, wqkv, bias) -> TensorValue:
        w, zeros, perm = wqkv
        rhs = [w] + ([zeros] if zeros is not None else []) + ([perm] if perm is not None else [])
        y = ops.qmatmul(QuantizationEncoding.GPTQ, self.quantization_config, x, *rhs)
        if bias is not None:
            y = y + (bias if bias.dtype == x.dtype else ops.cast(bias, x.dtype))
        return y

    def shard(self, devices):
        raise ValueError(f"{type(self).__name__}: sharding GPTQ weights is not supported")

    # -- loading ---------------------------------------------------------------------------------
    def _load_state_dict(self, state_dict, *, strict: bool) -> None:
        """Load by relative name: graph weights (q_proj.weight, ...) or checkpoint tensors
        (q_proj.qweight, q_proj.scales, ...).

        Raises:
            ValueError: bad tensors (see GPTQLinear.convert_checkpoint), unexpected names, or
                desc_act permutations that differ between q_proj, k_proj and v_proj.
        """
        children = _QKV + ("o_proj",)
        per: dict[str, dict] = {c: {} for c in children}
        rest = []
        for k, v in state_dict.items():
            head, _, tail = k.partition(".")
            if head in per:
                per[head][tail] = v
            else:
                rest.append(k)
        if strict and rest:
            raise ValueError(f"{type(self).__name__}.load_state_dict: unexpected weights "
                             f"{sorted(rest)}")
        for c in children:
            getattr(self, c).load_state_dict(per[c], strict=strict)
        if self.quantization_config.desc_act:
            perms = [weight_data(p.perm_idx) for p in self._projs()]
            if all(p is not None for p in perms) and not all(
                    np.array_equal(perms[0], p) for p in perms[1:]):
                raise ValueError(f"{type(self).__name__}: q_proj, k_proj and v_proj have "
                                 f"different g_idx orders; the fused qkv matmul needs one")

    def load_safetensors(self, path: str | os.PathLike[str], prefix: str = "", *,
                         strict: bool = True) -> None:
        """Load the tensors named `prefix + "q_proj.qweight"` etc. from a .safetensors file."""
        self.load_state_dict(load_safetensors(path, prefix), strict=strict)
