"""Quantized weights: ops `dequantize` (GGUF blocks -> float) and `qmatmul` (x @ dequant(W)^T).

GGUF weights are uint8 `[out, in / block_elems * block_bytes]`, the blocks as a .gguf file stores
them (ops.quant.gguf_blocks); the `encoding` attribute names the GGUF type. GPTQ weights are
MAX's single uint8 tensor `[in * bits / 8 + 2 * groups, out]` (packed int32 codes, then float16
scales; ops.quant.gptq_layout), with optional operands qzeros int32 `[groups, out * bits / 32]`
(asymmetric) and perm int32 `[in]` (desc_act: the input is gathered by it first); attribute
`bits` is 4 or 8 (absent in IR written before 8-bit existed: 4). References compute the exact product of the
dequantized weights in float64; they do not emulate MAX's on-the-fly 8-bit activations.
"""
from __future__ import annotations

import enum

import numpy as np

from graphir.dtype import DType
from graphir.opdef import OpDef, register

from . import _rules as R
from ._build import apply, tensors
from .quant.gguf_blocks import GGUF_BLOCK_GEOMETRY, dequantize_gguf, gguf_block_geometry
from .quant.gptq import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS, dequantize_gptq, resolve_group_size
from .quant.gptq_config import QuantizationConfig
from .quant.gptq_layout import gptq_weight_rows, split_gptq_weight_bytes

__all__ = ["QuantizationEncoding", "QuantizationConfig", "dequantize", "qmatmul"]


class QuantizationEncoding(enum.Enum):
    """How a weight is stored (MAX's max.graph.quantization.QuantizationEncoding).

    F32 / F16 / BF16 are GGUF's unquantized tensor types: layers treat them as float weights.
    """

    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    Q8_0 = "Q8_0"
    Q2_K = "Q2_K"
    Q3_K = "Q3_K"
    Q4_K = "Q4_K"
    Q5_K = "Q5_K"
    Q6_K = "Q6_K"
    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    GPTQ = "GPTQ"

    def __str__(self) -> str:
        return self.value

    @property
    def is_gguf(self) -> bool:
        return self is not QuantizationEncoding.GPTQ

    @property
    def is_float(self) -> bool:
        """An unquantized GGUF type (an ordinary float weight)."""
        return self.value in ("F32", "F16", "BF16")

    @property
    def float_dtype(self) -> DType:
        """The DType of a float encoding's weight."""
        table = {"F32": DType.float32, "F16": DType.float16, "BF16": DType.bfloat16}
        if self.value not in table:
            raise ValueError(f"{self.value} is a quantized encoding, not a float type")
        return table[self.value]

    @property
    def block_parameters(self):
        """(block_elems, block_bytes) of a GGUF encoding."""
        g = gguf_block_geometry(self.value)
        return g.block_elems, g.block_bytes

    @staticmethod
    def parse(encoding) -> "QuantizationEncoding":
        """A member from itself, its name (any case) or an enum with that name (gguf's types)."""
        if isinstance(encoding, QuantizationEncoding):
            return encoding
        name = encoding if isinstance(encoding, str) else getattr(encoding, "name", None)
        try:
            return QuantizationEncoding(str(name).upper())
        except ValueError:
            raise ValueError(f"unsupported quantization encoding {encoding!r}; supported: "
                             f"{[e.value for e in QuantizationEncoding]}") from None


# -- type rules -------------------------------------------------------------------------------
def _static(d, what: str) -> int:
    if not d.is_static:
        raise ValueError(f"{what} must be static, got {d}")
    return int(d)


def _gguf_in_features(w, enc: str, op: str) -> int:
    geo = gguf_block_geometry(enc)
    R.tensor(w, "weight")
    if w.dtype is not DType.uint8 or w.rank != 2:
        raise ValueError(f"{op}: {enc} weight must be uint8 [out, row_bytes] (GGUF blocks), got {w}")
    nbytes = _static(w.shape[1], f"{op}: the row byte count of the weight")
    if nbytes % geo.block_bytes:
        raise ValueError(f"{op}: {enc} rows of {nbytes} bytes are not whole blocks "
                         f"({geo.block_bytes} bytes per {geo.block_elems}-value block)")
    return nbytes // geo.block_bytes * geo.block_elems


def _encoding_attr(attrs, op: str) -> str:
    enc = attrs.get("encoding")
    if not isinstance(enc, str):
        raise ValueError(f"{op}: attribute encoding must be a string, got {enc!r}")
    if enc != "GPTQ" and enc not in GGUF_BLOCK_GEOMETRY:
        raise ValueError(f"{op}: unsupported encoding {enc!r}; supported: "
                         f"{sorted(GGUF_BLOCK_GEOMETRY) + ['GPTQ']}")
    return enc


def _dequantize_rule(ins, attrs):
    enc = _encoding_attr(attrs, "dequantize")
    if enc == "GPTQ":
        raise ValueError("dequantize: GPTQ weights are only consumed by qmatmul")
    if len(ins) != 1:
        raise ValueError(f"dequantize takes one operand (the blocks), got {len(ins)}")
    (w,) = ins
    n_in = _gguf_in_features(w, enc, "dequantize")
    return [R.like(w, dtype=DType.float32, shape=[w.shape[0], n_in])]


def _dequantize_ref(ins, a):
    enc = a["encoding"]
    n_in = ins[0].shape[1] // gguf_block_geometry(enc).block_bytes \
        * gguf_block_geometry(enc).block_elems
    return [dequantize_gguf(np.ascontiguousarray(ins[0]), enc, n_in)]


def _x(x, op: str) -> int:
    R.tensor(x, "x")
    if x.rank < 1 or not x.dtype.is_float:
        raise ValueError(f"{op}: x must be a float tensor [..., in_features], got {x}")
    return _static(x.shape[-1], f"{op}: in_features (the last dim of x)")


def _gptq_bits(attrs) -> int:
    bits = attrs.get("bits", 4)
    if isinstance(bits, bool) or bits not in GPTQ_BITS:
        raise ValueError(f"qmatmul: GPTQ bits must be one of {GPTQ_BITS}, got {bits!r}")
    return int(bits)


def _gptq_attrs(attrs):
    _gptq_bits(attrs)
    g, desc, sym = attrs.get("group_size"), attrs.get("desc_act"), attrs.get("sym")
    if isinstance(g, bool) or not isinstance(g, int) or (g <= 0 and g != -1):
        raise ValueError(f"qmatmul: GPTQ group_size must be a positive int or -1, got {g!r}")
    if not isinstance(desc, bool) or not isinstance(sym, bool):
        raise ValueError(f"qmatmul: GPTQ desc_act and sym must be bools, got {desc!r}, {sym!r}")
    if attrs.get("checkpoint_format") not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(f"qmatmul: checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}, "
                         f"got {attrs.get('checkpoint_format')!r}")
    return g, desc, sym


def _gptq_rule(ins, attrs):
    g, desc, sym = _gptq_attrs(attrs)
    want = 2 + (not sym) + desc
    names = "x, weight" + ("" if sym else ", qzeros") + (", perm" if desc else "")
    if len(ins) != want:
        raise ValueError(f"qmatmul: GPTQ with sym={sym}, desc_act={desc} takes {names}, got "
                         f"{len(ins)} operands")
    bits = _gptq_bits(attrs)
    per = 32 // bits
    x, w = ins[0], R.tensor(ins[1], "weight")
    n_in = _x(x, "qmatmul")
    try:
        groups = n_in // resolve_group_size(g, n_in)
        rows = gptq_weight_rows(n_in, g, bits)
    except ValueError as e:
        raise ValueError(f"qmatmul: {e}") from None
    if w.dtype is not DType.uint8 or w.rank != 2 or w.shape[0] != rows:
        raise ValueError(f"qmatmul: {bits}-bit GPTQ weight must be uint8 [{rows}, out] "
                         f"({n_in * bits // 8} rows of packed codes + {2 * groups} of float16 "
                         f"scales for in_features={n_in}, group_size={g}), got {w}")
    out = w.shape[1]
    k = 2
    if not sym:
        z = R.tensor(ins[k], "qzeros")
        k += 1
        if z.dtype is not DType.int32 or z.rank != 2 or z.shape[0] != groups \
                or z.shape[1] * per != out:
            raise ValueError(f"qmatmul: qzeros must be int32 [{groups}, {out} / {per}] "
                             f"({bits}-bit), got {z}")
    if desc:
        p = R.tensor(ins[k], "perm")
        if p.dtype not in (DType.int32, DType.int64, DType.uint32) or p.rank != 1 \
                or p.shape[0] != n_in:
            raise ValueError(f"qmatmul: perm must be int32 [{n_in}], got {p}")
    R.same_device([R.tensor(t) for t in ins])
    return [R.like(x, shape=list(x.shape[:-1]) + [out])]


def _qmatmul_rule(ins, attrs):
    enc = _encoding_attr(attrs, "qmatmul")
    if enc == "GPTQ":
        return _gptq_rule(ins, attrs)
    if len(ins) != 2:
        raise ValueError(f"qmatmul: {enc} takes x and the weight blocks, got {len(ins)} operands")
    x, w = ins
    n_in = _x(x, "qmatmul")
    geo = gguf_block_geometry(enc)
    if n_in % geo.block_elems:
        raise ValueError(f"qmatmul: in_features={n_in} is not a multiple of the {enc} block "
                         f"size ({geo.block_elems})")
    w_in = _gguf_in_features(w, enc, "qmatmul")
    if w_in != n_in:
        raise ValueError(f"qmatmul: {enc} weight rows of {int(w.shape[1])} bytes hold {w_in} "
                         f"values, x has in_features={n_in} (needs "
                         f"{n_in // geo.block_elems * geo.block_bytes} bytes per row)")
    R.same_device([x, w])
    return [R.like(x, shape=list(x.shape[:-1]) + [w.shape[0]])]


def _qmatmul_ref(ins, a):
    x, w = ins[0], np.ascontiguousarray(ins[1])
    enc = a["encoding"]
    n_in = x.shape[-1]
    if enc != "GPTQ":
        return [x @ dequantize_gguf(w, enc, n_in).astype(np.float64).T]
    k, zeros, perm = 2, None, None
    if not a["sym"]:
        zeros, k = np.ascontiguousarray(ins[2], dtype=np.int32), 3
    if a["desc_act"]:
        perm = np.asarray(ins[k]).astype(np.int64)
        if np.sort(perm).tolist() != list(range(n_in)):
            raise ValueError(f"perm is not a permutation of 0..{n_in - 1}")
        x = x[..., perm]
    bits = a.get("bits", 4)
    qweight, scales = split_gptq_weight_bytes(w, n_in, a["group_size"], bits)
    wf = dequantize_gptq(qweight, scales, zeros, None, a["group_size"],
                         checkpoint_format=a["checkpoint_format"], bits=bits)
    return [x @ wf.astype(np.float64)]


register(OpDef("dequantize", _dequantize_rule, _dequantize_ref, attr_names=("encoding",),
               doc="GGUF blocks uint8 [out, row_bytes] -> float32 [out, in]"))
register(OpDef("qmatmul", _qmatmul_rule, _qmatmul_ref,
               attr_names=("encoding", "group_size", "desc_act", "sym", "checkpoint_format",
                           "bits"),
               doc="x [..., in] @ dequantize(weight)^T -> [..., out]"))


# -- builders ---------------------------------------------------------------------------------
def dequantize(encoding, quantized):
    """Decode GGUF blocks uint8 `[out, row_bytes]` to float32 `[out, in]`.

    Example:
        >>> w = ops.dequantize(QuantizationEncoding.Q4_K, blocks)  # [out, in] float32
    """
    enc = QuantizationEncoding.parse(encoding)
    (w,) = tensors(quantized)
    return apply("dequantize", [w], encoding=enc.value)


def qmatmul(encoding, config: QuantizationConfig | None, lhs, *rhs):
    """`lhs [..., in] @ dequantize(weight)^T` for a quantized weight (MAX's ops.qmatmul).

    Args:
        encoding: a GGUF encoding (rhs = the uint8 blocks `[out, row_bytes]`) or GPTQ.
        config: the GPTQ QuantizationConfig; None for GGUF.
        lhs: float `[..., in]`.
        rhs: GGUF: the weight. GPTQ: weight uint8 `[in * bits / 8 + 2 groups, out]`, then
            qzeros int32 `[groups, out * bits / 32]` unless config.sym, then perm int32 `[in]` if
            config.desc_act.

    Example:
        >>> y = ops.qmatmul(QuantizationEncoding.Q4_0, None, x, w_blocks)  # [T, out]
    """
    enc = QuantizationEncoding.parse(encoding)
    vals = tensors(lhs, *rhs)
    if enc is not QuantizationEncoding.GPTQ:
        if config is not None:
            raise ValueError(f"qmatmul: {enc.value} takes no quantization config")
        return apply("qmatmul", vals, encoding=enc.value)
    if not isinstance(config, QuantizationConfig):
        raise ValueError(f"qmatmul: GPTQ needs a QuantizationConfig, got {config!r}")
    return apply("qmatmul", vals, encoding=enc.value, group_size=config.group_size,
                 desc_act=config.desc_act, sym=config.sym,
                 checkpoint_format=config.checkpoint_format, bits=config.bits)
