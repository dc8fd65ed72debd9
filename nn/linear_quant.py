"""Linear layers over quantized weights: GGUFQLinear (GGUF blocks) and GPTQLinear (4/8-bit GPTQ).

Both keep the weight as stored on disk in the graph and multiply with `ops.qmatmul`; loading
checks every byte count and scale so bad data fails at load time with the tensor's name.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np

from graphir import ops
from graphir.device import DeviceRef
from graphir.dtype import DType
from graphir.value import TensorValue, as_tensor
from graphir.weight import Weight
from graphir.ops.quant.gguf_blocks import dequantize_gguf, gguf_row_nbytes
from graphir.ops.quant.gptq import dequantize_gptq, g_idx_to_perm, resolve_group_size, unpack_cols
from graphir.ops.quant.gptq_layout import gptq_weight_bytes, gptq_weight_rows, reorder_gptq_rows
from graphir.ops.quantized import QuantizationConfig, QuantizationEncoding

from .module import Module

__all__ = ["GGUFQLinear", "GPTQLinear", "gguf_weight_array", "load_safetensors"]


def _dim(cls: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{cls}: {name} must be a positive int, got {v!r}")
    return v


def gguf_weight_array(data: np.ndarray, encoding, n_cols: int, what: str = "weight") -> np.ndarray:
    """Check GGUF data for `encoding` and return what a GGUFQLinear weight holds: the uint8 blocks
    (quantized) or float32 values (F32 / F16 / BF16).

    Raises:
        ValueError: wrong dtype, a byte count that is not whole blocks or does not match
            `n_cols` (truncated data), or a block whose scale is NaN or infinite.
    """
    enc = QuantizationEncoding.parse(encoding)
    try:
        values = dequantize_gguf(np.asarray(data), enc.value, n_cols)  # validates every block
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return values if enc.is_float else np.ascontiguousarray(data)


class GGUFQLinear(Module):
    """A linear layer whose weight is GGUF blocks uint8 `[out_dim, row_bytes]`.

    F32 / F16 / BF16 encodings hold an ordinary float weight `[out_dim, in_dim]` of that dtype
    (cast to the input dtype before the matmul). The bias, if any, is float32.

    Example:
        >>> lin = GGUFQLinear(256, 64, DType.uint8, quantization_encoding="Q4_K")
        >>> lin.load_state_dict({"weight": quantize_gguf(w, "Q4_K")})
        >>> y = lin(x)  # inside a Graph: ops.qmatmul
    """

    def __init__(self, in_dim: int, out_dim: int, dtype: DType = DType.uint8,
                 device: DeviceRef | None = None, has_bias: bool = False,
                 quantization_encoding=None, name: str | None = None, **unused) -> None:
        super().__init__()
        cls = type(self).__name__
        if quantization_encoding is None:
            raise ValueError(f"{cls}: quantization_encoding is required")
        if unused.get("float8_config") is not None:
            raise ValueError(f"{cls}: float8_config does not apply to GGUF weights")
        enc = QuantizationEncoding.parse(quantization_encoding)
        if not enc.is_gguf:
            raise ValueError(f"{cls}: {enc.value} is not a GGUF encoding; use GPTQLinear")
        self.encoding = enc
        self.in_dim, self.out_dim = _dim(cls, "in_dim", in_dim), _dim(cls, "out_dim", out_dim)
        self.device = device or DeviceRef.CPU()
        self.has_bias = bool(has_bias)
        prefix = f"{name}." if name else ""
        if enc.is_float:
            self.weight = Weight(prefix + "weight", enc.float_dtype, [out_dim, in_dim],
                                 self.device)
        else:
            try:
                nbytes = gguf_row_nbytes(enc.value, in_dim)
            except ValueError as e:
                raise ValueError(f"{cls}: in_dim: {e}") from None
            self.weight = Weight(prefix + "weight", DType.uint8, [out_dim, nbytes], self.device,
                                 quantization_encoding=enc)
        if has_bias:
            self.bias = Weight(prefix + "bias", DType.float32, [out_dim], self.device)

    def _load_state_dict(self, state_dict: Mapping[str, object], *, strict: bool) -> None:
        """Load "weight" (GGUF blocks, or floats for a float encoding) and "bias"; every block is
        checked (byte counts, finite scales)."""
        sd = dict(state_dict)
        if "weight" in sd:
            sd["weight"] = gguf_weight_array(sd["weight"], self.encoding, self.in_dim,
                                             f"{type(self).__name__} weight {self.weight.name!r}")
        super()._load_state_dict(sd, strict=strict)

    def dequantized_weight(self) -> np.ndarray:
        """The loaded weight as float32 `[out_dim, in_dim]` (what the matmul multiplies)."""
        from .module import weight_data

        data = weight_data(self.weight)
        if data is None:
            raise ValueError(f"{type(self).__name__}: no weight loaded")
        return np.asarray(data, np.float32) if self.encoding.is_float else \
            dequantize_gguf(data, self.encoding.value, self.in_dim)

    def __call__(self, x) -> TensorValue:
        x = as_tensor(x)
        if self.encoding.is_float:
            w = as_tensor(self.weight)
            y = ops.matmul(x, w if w.dtype == x.dtype else ops.cast(w, x.dtype), transpose_b=True)
        else:
            y = ops.qmatmul(self.encoding, None, x, self.weight)
        if self.has_bias:
            b = as_tensor(self.bias)
            y = y + (b if b.dtype == x.dtype else ops.cast(b, x.dtype))
        return y


class GPTQLinear(Module):
    """A 4- or 8-bit GPTQ linear layer in MAX's layout.

    Graph weights: `weight` uint8 `[in * bits / 8 + 2 groups, out]` (packed codes then float16
    scales, input rows grouped contiguously), `qzeros` int32 `[groups, out * bits / 32]` unless
    symmetric,
    `perm_idx` int32 `[in]` with desc_act, `bias` with has_bias. `load_state_dict` also takes the
    usual checkpoint tensors (qweight, qzeros, scales, g_idx, bias) and converts them.

    Example:
        >>> cfg = QuantizationConfig(group_size=128, desc_act=True, sym=False)
        >>> lin = GPTQLinear(256, 64, DType.float32, quantization_config=cfg)
        >>> lin.load_state_dict({"qweight": qw, "qzeros": qz, "scales": sc, "g_idx": g})
    """

    def __init__(self, in_dim: int, out_dim: int, dtype: DType = DType.float32,
                 device: DeviceRef | None = None, has_bias: bool = False,
                 quantization_encoding=QuantizationEncoding.GPTQ,
                 quantization_config: QuantizationConfig | None = None, name: str | None = None,
                 **unused) -> None:
        super().__init__()
        cls = type(self).__name__
        if not isinstance(quantization_config, QuantizationConfig):
            raise ValueError(f"{cls}: quantization_config must be a QuantizationConfig, got "
                             f"{quantization_config!r}")
        if QuantizationEncoding.parse(quantization_encoding) is not QuantizationEncoding.GPTQ:
            raise ValueError(f"{cls}: quantization_encoding must be GPTQ, got "
                             f"{quantization_encoding!r}")
        if unused.get("float8_config") is not None:
            raise ValueError(f"{cls}: float8_config does not apply to GPTQ weights")
        self.config = cfg = quantization_config
        self.in_dim, self.out_dim = _dim(cls, "in_dim", in_dim), _dim(cls, "out_dim", out_dim)
        per = cfg.pack_factor
        if out_dim % per:
            raise ValueError(f"{cls}: out_dim={out_dim} must be a multiple of {per} (packed "
                             f"{cfg.bits}-bit qzeros)")
        try:
            self.groups = cfg.groups(in_dim)
            rows = gptq_weight_rows(in_dim, cfg.group_size, cfg.bits)
        except ValueError as e:
            raise ValueError(f"{cls}: {e}") from None
        self.dtype, self.device, self.has_bias = dtype, device or DeviceRef.CPU(), bool(has_bias)
        prefix = f"{name}." if name else ""
        self.weight = Weight(prefix + "weight", DType.uint8, [rows, out_dim], self.device,
                             quantization_encoding=QuantizationEncoding.GPTQ)
        if not cfg.sym:
            self.qzeros = Weight(prefix + "qzeros", DType.int32, [self.groups, out_dim // per],
                                 self.device)
        if cfg.desc_act:
            self.perm_idx = Weight(prefix + "perm_idx", DType.int32, [in_dim], self.device)
        if has_bias:
            self.bias = Weight(prefix + "bias", dtype, [out_dim], self.device)

    # -- loading ---------------------------------------------------------------------------------
    def convert_checkpoint(self, sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checkpoint tensors (qweight, scales, qzeros, g_idx, bias) -> this layer's graph weights.

        Raises:
            ValueError: missing or misshaped tensors, a g_idx that is not a permutation of groups
                (or not the plain order without desc_act), qzeros that are not 8 when symmetric,
                scales that are not finite as float16.
        """
        cls, cfg, n_in, n_out = type(self).__name__, self.config, self.in_dim, self.out_dim
        missing = [k for k in ("qweight", "scales") if k not in sd]
        if not cfg.sym and "qzeros" not in sd:
            missing.append("qzeros")
        if missing:
            raise ValueError(f"{cls}: missing checkpoint tensors {missing}")
        qweight, scales = np.asarray(sd["qweight"]), np.asarray(sd["scales"])
        bits, per = cfg.bits, cfg.pack_factor
        if qweight.shape != (n_in // per, n_out) or qweight.dtype not in (np.int32, np.uint32):
            raise ValueError(f"{cls}: qweight must be int32 [{n_in // per}, {n_out}] ({per} "
                             f"{bits}-bit codes per int32), got {qweight.dtype} "
                             f"{qweight.shape}")
        if scales.shape != (self.groups, n_out):
            raise ValueError(f"{cls}: scales has shape {scales.shape}, expected "
                             f"({self.groups}, {n_out}) for in_features={n_in}, "
                             f"group_size={cfg.group_size}")
        with np.errstate(over="ignore", invalid="ignore"):
            bad = ~np.isfinite(scales.astype(np.float16))
        if bad.any():   # as GGUF's loader refuses a block with a non-finite scale
            g, c = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{cls}: scales hold {int(bad.sum())} value(s) that are not finite "
                             f"as float16; first at group {g}, column {c} "
                             f"({float(scales[g, c])})")
        qzeros = sd.get("qzeros")
        # Decoding once checks shapes and finds out-of-range data before it reaches a graph.
        dequantize_gptq(qweight, scales.astype(np.float16), None if qzeros is None else
                        np.asarray(qzeros), None, cfg.group_size,
                        checkpoint_format=cfg.checkpoint_format, bits=bits)
        out: dict[str, np.ndarray] = {}
        if qzeros is not None and cfg.sym:
            zeros = unpack_cols(np.asarray(qzeros), bits).astype(np.int16)
            zeros += cfg.checkpoint_format == "gptq"
            mid = 1 << (bits - 1)
            if (zeros != mid).any():
                raise ValueError(f"{cls}: sym=True but qzeros hold zero points other than {mid} "
                                 f"(e.g. {int(zeros[zeros != mid][0])}); use sym=False")
        elif qzeros is not None:
            out["qzeros"] = np.ascontiguousarray(qzeros, dtype=np.int32)
        g_idx = sd.get("g_idx")
        size = resolve_group_size(cfg.group_size, n_in)
        if cfg.desc_act:
            if g_idx is None:
                raise ValueError(f"{cls}: desc_act=True needs g_idx")
            try:
                perm = g_idx_to_perm(np.asarray(g_idx), size)
            except ValueError as e:
                raise ValueError(f"{cls}: g_idx is not a permutation of groups: {e}") from None
            qweight = reorder_gptq_rows(qweight, perm, bits)
            out["perm_idx"] = perm
        elif g_idx is not None and (np.asarray(g_idx) != np.arange(n_in) // size).any():
            raise ValueError(f"{cls}: g_idx is not the plain order i // group_size; the "
                             f"checkpoint needs desc_act=True")
        out["weight"] = gptq_weight_bytes(qweight, scales)
        if "bias" in sd:
            out["bias"] = np.asarray(sd["bias"], dtype=np.float32)
        return out

    def _load_state_dict(self, state_dict: Mapping[str, object], *, strict: bool) -> None:
        """Load graph weights (weight, qzeros, perm_idx, bias) or checkpoint tensors (qweight,
        scales, qzeros, g_idx, bias)."""
        sd = dict(state_dict)
        if "qweight" in sd:
            known = {"qweight", "scales", "qzeros", "g_idx", "bias"}
            if strict and set(sd) - known:
                raise ValueError(f"{type(self).__name__}: unexpected checkpoint tensors "
                                 f"{sorted(set(sd) - known)}")
            sd = self.convert_checkpoint(sd)
        super()._load_state_dict(sd, strict=strict)

    def __call__(self, x) -> TensorValue:
        x = as_tensor(x)
        y = ops.qmatmul(QuantizationEncoding.GPTQ, self.config, x, *self.qmatmul_operands())
        if self.has_bias:
            b = as_tensor(self.bias)
            y = y + (b if b.dtype == x.dtype else ops.cast(b, x.dtype))
        return y

    def qmatmul_operands(self) -> list:
        """weight, then qzeros (asymmetric), then perm_idx (desc_act): qmatmul's rhs."""
        rhs = [self.weight]
        if not self.config.sym:
            rhs.append(self.qzeros)
        if self.config.desc_act:
            rhs.append(self.perm_idx)
        return rhs


def load_safetensors(path: str | os.PathLike[str], prefix: str = "",
                     names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file whose names start with `prefix`, prefix removed
    (`names`: only these, each read alone, so a caller never holds the rest of the file).

    Example:
        >>> sd = load_safetensors("model.safetensors", "model.layers.0.self_attn.")
        >>> sorted(sd)[:2]  # doctest: +SKIP
        ['k_proj.g_idx', 'k_proj.qweight']
    """
    from safetensors import SafetensorError, safe_open  # optional dependency, only to read files

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {os.fspath(path)!r}")
    want = None if names is None else set(names)
    try:
        with safe_open(os.fspath(path), framework="np") as f:
            return {k[len(prefix):]: f.get_tensor(k) for k in f.keys()
                    if k.startswith(prefix) and (want is None or k[len(prefix):] in want)}
    except SafetensorError as e:
        raise ValueError(f"{os.fspath(path)}: cannot read the .safetensors file (truncated or "
                         f"corrupt?): {e}") from None
