"""Quantized weights: ops `dequantize` (GGUF blocks -> float) and `qmatmul` (x @ dequant(W)^T).

GGUF weights are uint8 `[out, in / block_elems * block_bytes]`, the blocks as a .gguf file stores
them (ops.quant.gguf_blocks). GPTQ weights are MAX's single uint8 tensor
`[in / 2 + 2 * groups, out]` (packed int32 codes, then float16 scales; ops.quant.gptq_layout),
with optional operands qzeros int32 `[groups, out / 8]` (asymmetric) and perm int32 `[in]`
(desc_act: the input is gathered by it first). References compute the exact product of the
dequantized weights in float64; they do not emulate MAX's on-the-fly 8-bit activations.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from graphir.dtype import DType
from graphir.opdef import OpDef, register

from . import _rules as R
from ._build import apply, tensors
from .quant.gguf_blocks import GGUF_BLOCK_GEOMETRY, dequantize_gguf, gguf_block_geometry
from .quant.gptq import GPTQ_CHECKPOINT_FORMATS, dequantize_gptq, resolve_group_size
from .quant.gptq_layout import gptq_weight_rows, split_gptq_weight_bytes

__all__ = ["QuantizationEncoding", "QuantizationConfig", "dequantize", "qmatmul"]


class QuantizationEncoding(enum.Enum):
    """How a weight is stored (MAX's max.graph.quantization.QuantizationEncoding).

    F32 / F16 / BF16 are GGUF's unquantized tensor types: layers treat them as float weights.
    """

    Q4_0 = "Q4_0"
    Q8_0 = "Q8_0"
    Q4_K = "Q4_K"
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


@dataclass(frozen=True)
class QuantizationConfig:
    """GPTQ parameters (MAX's QuantizationConfig), read off a checkpoint's quantize_config.

    Args:
        quant_method: "gptq".
        bits: 4 (the only width supported).
        group_size: input rows per scale group; -1 for one group over all inputs.
        desc_act: activation order: the checkpoint's g_idx is a permutation of groups.
        sym: symmetric (zero point 8, no qzeros) or asymmetric (qzeros per group and column).
        checkpoint_format: "gptq" (AutoGPTQ v1: stored zeros are zero - 1) or "gptq_v2".
    """

    quant_method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"

    def __post_init__(self):
        if self.quant_method != "gptq":
            raise ValueError(f"QuantizationConfig: quant_method must be 'gptq', got "
                             f"{self.quant_method!r}")
        if self.bits != 4:
            raise ValueError(f"QuantizationConfig: only 4-bit GPTQ is supported, got bits="
                             f"{self.bits!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or (g <= 0 and g != -1):
            raise ValueError(f"QuantizationConfig: group_size must be a positive int or -1, "
                             f"got {g!r}")
        if self.checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
            raise ValueError(f"QuantizationConfig: checkpoint_format must be one of "
                             f"{GPTQ_CHECKPOINT_FORMATS}, got {self.checkpoint_format!r}")

    def groups(self, in_features: int) -> int:
        """Number of scale groups over `in_features` inputs (validates divisibility)."""
        return in_features // resolve_group_size(self.group_size, in_features)


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


def _gptq_attrs(attrs):
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
    x, w = ins[0], R.tensor(ins[1], "weight")
    n_in = _x(x, "qmatmul")
    try:
        groups = n_in // resolve_group_size(g, n_in)
        rows = gptq_weight_rows(n_in, g)
    except ValueError as e:
        raise ValueError(f"qmatmul: {e}") from None
    if w.dtype is not DType.uint8 or w.rank != 2 or w.shape[0] != rows:
        raise ValueError(f"qmatmul: GPTQ weight must be uint8 [{rows}, out] ({n_in // 2} rows of "
                         f"packed codes + {2 * groups} of float16 scales for in_features={n_in}, "
                         f"group_size={g}), got {w}")
    out = w.shape[1]
    k = 2
    if not sym:
        z = R.tensor(ins[k], "qzeros")
        k += 1
        if z.dtype is not DType.int32 or z.rank != 2 or z.shape[0] != groups \
                or z.shape[1] * 8 != out:
            raise ValueError(f"qmatmul: qzeros must be int32 [{groups}, {out} / 8], got {z}")
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
    qweight, scales = split_gptq_weight_bytes(w, n_in, a["group_size"])
    wf = dequantize_gptq(qweight, scales, zeros, None, a["group_size"],
                         checkpoint_format=a["checkpoint_format"])
    return [x @ wf.astype(np.float64)]


register(OpDef("dequantize", _dequantize_rule, _dequantize_ref, attr_names=("encoding",),
               doc="GGUF blocks uint8 [out, row_bytes] -> float32 [out, in]"))
register(OpDef("qmatmul", _qmatmul_rule, _qmatmul_ref,
               attr_names=("encoding", "group_size", "desc_act", "sym", "checkpoint_format"),
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
        rhs: GGUF: the weight. GPTQ: weight uint8 `[in/2 + 2 groups, out]`, then qzeros int32
            `[groups, out/8]` unless config.sym, then perm int32 `[in]` if config.desc_act.

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
                 checkpoint_format=config.checkpoint_format)
