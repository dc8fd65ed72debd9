"""GGUFQAttentionWithRope: AttentionWithRope over GGUF-quantized q/k/v/o weights.

Everything after the qkv projection (RoPE, the paged store, flash attention) is
AttentionWithRope's; only the weights and the projection differ. Each projection keeps the
encoding its tensor has in the file (llama.cpp's Q4_K_M stores attn_v as Q6_K next to Q4_K
q/k/o): q, k and v run as one qmatmul over the joined blocks when they share an encoding;
otherwise each run of neighbours stored alike (Q4_K_M's q and k) takes one qmatmul over its
joined blocks, and the outputs are joined.
"""
from __future__ import annotations

import os
from itertools import groupby
from typing import Callable, Mapping, Sequence

import numpy as np

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.value import TensorValue, as_tensor
from graphir.ops.quant.gguf_blocks import dequantize_gguf
from graphir.ops.quantized import QuantizationEncoding

from ..gguf_config import PROJECTIONS, GGUFAttentionConfig
from ..gguf_loader import GGUFFile, read_gguf
from ..kv_cache import KVCacheParams
from ..linear import Linear
from ..linear_quant import GGUFQLinear
from ..norm import RMSNorm
from ..rotary_embedding import RotaryEmbedding
from .attention_with_rope import AttentionWithRope
from .mask_config import MHAMaskVariant

# llama.cpp's tensor names for one block's attention, by our module names.
GGUF_ATTENTION_NAMES = dict(PROJECTIONS)
_QKV = ("q_proj", "k_proj", "v_proj")


def _encodings(cls: str, quantization_encoding) -> dict[str, QuantizationEncoding]:
    if isinstance(quantization_encoding, Mapping):
        given = dict(quantization_encoding)
        if set(given) != set(PROJECTIONS):
            raise ValueError(f"{cls}: a per-projection quantization_encoding needs exactly the "
                             f"keys {sorted(PROJECTIONS)}, got {sorted(given)}")
    else:
        given = dict.fromkeys(PROJECTIONS, quantization_encoding)
    out = {k: QuantizationEncoding.parse(v) for k, v in given.items()}
    for name, enc in out.items():
        if not enc.is_gguf:
            raise ValueError(f"{cls}: quantization_encoding of {name} must be a GGUF encoding, "
                             f"got {enc.value}")
    return out


class GGUFQAttentionWithRope(AttentionWithRope):
    """Attention with GGUF quantized weights (MAX's class).

    Weights: q_proj/k_proj/v_proj/o_proj.weight as GGUF blocks uint8 `[out, row_bytes]`, each in
    its own encoding (F32 / F16 / BF16: float weights); q/k/v biases float32 with has_bias;
    q_norm/k_norm float32 `[head_dim]` with use_qk_norm. `quantization_encoding` is one encoding
    for all four projections or a mapping {"q_proj": .., "k_proj": .., "v_proj": ..,
    "o_proj": ..}; loading a file adopts the encodings stored there.

    Example:
        >>> attn = GGUFQAttentionWithRope.from_gguf("qwen2.5-0.5b-q4_k_m.gguf", layer=0)
        >>> attn.quantization_encodings["v_proj"], attn.rope.interleaved
        (<QuantizationEncoding.Q6_K: 'Q6_K'>, False)
    """

    def __init__(self, *, rope: RotaryEmbedding, num_attention_heads: int,
                 num_key_value_heads: int, hidden_size: int, kv_params: KVCacheParams,
                 dtype: DType, quantization_encoding,
                 devices: Sequence[DeviceRef] | None = None,
                 linear_cls: Callable[..., Linear] = Linear, scale: float | None = None,
                 has_bias: bool = False, clip_qkv: float | None = None,
                 mask_variant: MHAMaskVariant | str = MHAMaskVariant.CAUSAL_MASK,
                 use_qk_norm: bool = False, rms_norm_eps: float = 1e-6,
                 sliding_window: int | None = None, _fuse_rope_and_store: bool = True) -> None:
        cls = type(self).__name__
        encs = _encodings(cls, quantization_encoding)
        if clip_qkv is not None:
            bad = [f"{n}={encs[n].value}" for n in _QKV if not encs[n].is_float]
            if bad:
                raise ValueError(f"{cls}: clip_qkv cannot clamp quantized blocks ({', '.join(bad)})")
        first = encs["q_proj"]

        def gguf_linear(**kw):
            return GGUFQLinear(**kw, quantization_encoding=first)

        super().__init__(rope=rope, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, hidden_size=hidden_size,
                         kv_params=kv_params, devices=devices, dtype=dtype,
                         linear_cls=gguf_linear, scale=scale, has_bias=has_bias,
                         clip_qkv=clip_qkv, mask_variant=mask_variant, use_qk_norm=use_qk_norm,
                         rms_norm_eps=rms_norm_eps, sliding_window=sliding_window,
                         _fuse_rope_and_store=_fuse_rope_and_store)
        self._o_linear_cls = linear_cls
        self._replace_o_proj(linear_cls, quantization_encoding=first)
        if self.use_qk_norm and not dtype.is_float:  # dtype names the weights' storage (uint8)
            dev = self.devices[0]
            self.q_norm = RMSNorm(self.head_dim, DType.float32, self.rms_norm_eps, device=dev)
            self.k_norm = RMSNorm(self.head_dim, DType.float32, self.rms_norm_eps, device=dev)
        for name, enc in encs.items():
            self._set_encoding(name, enc)
        self.gguf_config: GGUFAttentionConfig | None = None

    # -- encodings -------------------------------------------------------------------------------
    @property
    def quantization_encodings(self) -> dict[str, QuantizationEncoding]:
        """The encoding of each projection, by name."""
        return {n: getattr(self, n).encoding for n in PROJECTIONS}

    @property
    def quantization_encoding(self) -> QuantizationEncoding | None:
        """The encoding all four projections share, or None when they differ."""
        encs = set(self.quantization_encodings.values())
        return encs.pop() if len(encs) == 1 else None

    def _qkv_encoding(self) -> QuantizationEncoding | None:
        encs = {getattr(self, n).encoding for n in _QKV}
        return encs.pop() if len(encs) == 1 else None

    def _set_encoding(self, name: str, enc: QuantizationEncoding) -> None:
        """Rebuild projection `name` for `enc` (its weights are then unloaded)."""
        old = getattr(self, name)
        if getattr(old, "encoding", None) is enc:
            return
        if name == "o_proj" and self._o_linear_cls is not Linear:
            self._replace_o_proj(self._o_linear_cls, quantization_encoding=enc)
            return
        setattr(self, name, GGUFQLinear(in_dim=old.in_dim, out_dim=old.out_dim,
                                        device=self.devices[0], has_bias=old.has_bias,
                                        quantization_encoding=enc))

    # -- MAX properties ----------------------------------------------------------------------
    @property
    def wqkv(self) -> TensorValue:
        """The q, k and v weights stacked along the output rows: GGUF blocks uint8
        `[(NH + 2 NKV) * D, row_bytes]` (float `[.., hidden]` for a float encoding).

        Raises:
            ValueError: q, k and v are stored in different encodings (they have no joint blocks).
        """
        if self._qkv_encoding() is None:
            got = ", ".join(f"{n}={getattr(self, n).encoding.value}" for n in _QKV)
            raise ValueError(f"{type(self).__name__}: q/k/v are stored in different encodings "
                             f"({got}); there is no single wqkv: they run as separate qmatmuls "
                             f"(neighbours stored alike share one)")
        return ops.concat([self._clip(p.weight) for p in (self.q_proj, self.k_proj, self.v_proj)],
                          axis=0)

    def _weights_in_order(self):
        if self._qkv_encoding() is not None:
            return super()._weights_in_order()
        ws = tuple(self._clip(getattr(self, n).weight) if getattr(self, n).encoding.is_float
                   else as_tensor(getattr(self, n).weight) for n in _QKV)
        bias = self.wqkv_bias
        qn = kn = None
        if self.use_qk_norm:
            qn, kn = as_tensor(self.q_norm.weight), as_tensor(self.k_norm.weight)
        as_tensor(self.o_proj.weight)
        return ws, bias, qn, kn

    @staticmethod
    def _matmul(enc: QuantizationEncoding, x: TensorValue, w) -> TensorValue:
        if enc.is_float:
            w = as_tensor(w)
            return ops.matmul(x, w if w.dtype == x.dtype else ops.cast(w, x.dtype),
                              transpose_b=True)
        return ops.qmatmul(enc, None, x, w)

    def _qkv(self, x: TensorValue, wqkv, bias) -> TensorValue:
        enc = self._qkv_encoding()
        if enc is not None and enc.is_float:
            w = wqkv if wqkv.dtype == x.dtype else ops.cast(wqkv, x.dtype)
            b = bias if bias is None or bias.dtype == x.dtype else ops.cast(bias, x.dtype)
            return ops.fused_qkv_matmul(x, w, b)
        if enc is not None:
            y = ops.qmatmul(enc, None, x, wqkv)
        else:
            # Neighbours stored alike share one matmul over their stacked rows (Q4_K_M: q and
            # k in Q4_K, v in Q6_K): one kernel call fewer, x read once for both.
            encs = [getattr(self, n).encoding for n in _QKV]
            runs = [(e, [w for _, w in run])
                    for e, run in groupby(zip(encs, wqkv), key=lambda ew: ew[0])]
            y = ops.concat([self._matmul(e, x, ws[0] if len(ws) == 1 else
                                         ops.concat([as_tensor(w) for w in ws], axis=0))
                            for e, ws in runs], axis=1)
        if bias is not None:
            y = y + (bias if bias.dtype == x.dtype else ops.cast(bias, x.dtype))
        return y

    def shard(self, devices):
        raise ValueError(f"{type(self).__name__}: sharding GGUF weights is not supported")

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], layer: int, *,
                  max_seq_len: int | None = None, page_size: int = 128,
                  kv_dtype: DType = DType.float32, devices: Sequence[DeviceRef] | None = None,
                  scale: float | None = None,
                  _fuse_rope_and_store: bool = True) -> "GGUFQAttentionWithRope":
        """Build block `layer`'s attention from a .gguf file's metadata and load its weights.

        Head counts, head size, hidden size, RoPE (theta, pairing, scaling), q/k/v biases, q/k
        norms and their eps, the sliding window and each projection's encoding come from the
        file; `.rope` and `.kv_params` hold what the layer was built with, `.gguf_config` what
        was read.

        Raises:
            ValueError: see GGUFAttentionConfig.from_file and load_from_gguf.
        """
        f = read_gguf(path)
        where = os.fspath(path)
        try:
            cfg = GGUFAttentionConfig.from_file(f, layer)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        dev = list(devices) if devices else [DeviceRef.CPU()]
        window = cfg.sliding_window
        attn = cls(rope=cfg.rotary_embedding(max_seq_len, device=dev[0]),
                   num_attention_heads=cfg.num_attention_heads,
                   num_key_value_heads=cfg.num_key_value_heads, hidden_size=cfg.hidden_size,
                   kv_params=cfg.kv_params(dtype=kv_dtype, page_size=page_size,
                                           devices=tuple(dev)),
                   devices=dev, dtype=DType.uint8, quantization_encoding=cfg.encodings,
                   scale=scale, has_bias=cfg.has_bias, use_qk_norm=cfg.use_qk_norm,
                   rms_norm_eps=cfg.rms_norm_eps, sliding_window=window,
                   mask_variant=MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK if window
                   else MHAMaskVariant.CAUSAL_MASK,
                   _fuse_rope_and_store=_fuse_rope_and_store)
        attn._load_file(f, layer, cfg, where, strict=True)
        return attn

    def load_from_gguf(self, path: str | os.PathLike[str], layer: int, *,
                       strict: bool = True) -> None:
        """Load `blk.{layer}.attn_{q,k,v,output}.{weight,bias}` (and attn_{q,k}_norm) from a
        .gguf file, each projection taking the encoding stored there.

        Raises:
            ValueError: the file's metadata disagrees with this layer (head counts, sizes, RoPE
                pairing or theta, biases, q/k norm), a missing tensor or one in an unsupported
                encoding, a shape mismatch, corrupt or truncated blocks.
        """
        where = os.fspath(path)
        f = read_gguf(path)
        try:
            cfg = GGUFAttentionConfig.from_file(f, layer)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        self._load_file(f, layer, cfg, where, strict=strict)

    def _check_config(self, cfg: GGUFAttentionConfig, where: str) -> None:
        mine = {"num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "hidden_size": self.hidden_size, "head_dim": self.head_dim,
                "has_bias": self.has_bias, "use_qk_norm": self.use_qk_norm,
                "interleaved": self.rope.interleaved}
        for key, value in mine.items():
            if getattr(cfg, key) != value:
                hint = " (the RoPE pairing of the architecture)" if key == "interleaved" else ""
                raise ValueError(f"{where}: the file's {cfg.architecture} attention has "
                                 f"{key}={getattr(cfg, key)}{hint}, this layer has {value}; "
                                 f"build it with GGUFQAttentionWithRope.from_gguf")
        if not np.isclose(self.rope.theta, cfg.rope_theta, rtol=1e-6):
            raise ValueError(f"{where}: the file's rope theta is {cfg.rope_theta}, the layer's "
                             f"rope has {self.rope.theta}")

    def _load_file(self, f: GGUFFile, layer: int, cfg: GGUFAttentionConfig, where: str, *,
                   strict: bool) -> None:
        self._check_config(cfg, where)
        # Projections are rebuilt for the file's encodings as its tensors are read: a refused
        # file puts the old ones (and their weights) back.
        with self._all_or_nothing():
            self._load_tensors(f, layer, where, strict=strict)
        self.gguf_config = cfg

    def _load_tensors(self, f: GGUFFile, layer: int, where: str, *, strict: bool) -> None:
        blk = f"blk.{layer}."
        sd = {}
        try:
            for ours, theirs in PROJECTIONS.items():
                t = f.tensor(f"{blk}{theirs}.weight", f"{ours}.weight")
                lin = getattr(self, ours)
                want = (lin.out_dim, lin.in_dim)
                if t.shape != want:
                    raise ValueError(f"{blk}{theirs}.weight: shape {list(t.shape)}, the layer "
                                     f"expects {list(want)} for {ours}")
                self._set_encoding(ours, QuantizationEncoding.parse(t.encoding))
                sd[f"{ours}.weight"] = t.data
                if self.has_bias and ours != "o_proj":
                    sd[f"{ours}.bias"] = _vector(f, f"{blk}{theirs}.bias", lin.out_dim)
            if self.use_qk_norm:
                for ours, theirs in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
                    sd[f"{ours}.weight"] = _vector(f, f"{blk}{theirs}.weight", self.head_dim)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        self.load_state_dict(sd, strict=strict)

    def _load_state_dict(self, state_dict, *, strict: bool) -> None:
        """Load by relative name (q_proj.weight, q_norm.weight, ...); GGUF blocks are validated
        per linear."""
        children = {"q_proj", "k_proj", "v_proj", "o_proj"}
        if self.use_qk_norm:
            children |= {"q_norm", "k_norm"}
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


def _vector(f: GGUFFile, name: str, n: int) -> np.ndarray:
    """A 1-D tensor (bias, norm weight) as float32 [n]."""
    t = f.tensor(name)
    if t.shape != (n,):
        raise ValueError(f"{name}: shape {list(t.shape)}, expected [{n}]")
    return dequantize_gguf(np.asarray(t.data).reshape(1, -1), t.encoding, n).reshape(-1)
