"""4-bit weights in the GPU's nib layout: ops `nib_repack` and `nib_matmul`.

The cuda backend rewrites `qmatmul` of a 4-bit weight (GGUF Q4_0, Q4_1, Q4_K; GPTQ 4-bit
without desc_act) or a GGUF Q6_K one (low nibbles in the same layout, high bits apart) into
`nib_matmul(x, nib_repack(weight...))` before lowering (lowering/nib_rewrites.py). The repack
reads only weights, so the executor runs it once when the model loads (a host step) and
uploads its results; no other backend sees these ops unless a graph is written with them.

- `nib_repack(weight[, qzeros])`, attrs `encoding` (as qmatmul's), `fmt`, and for GPTQ
  `group_size`, `sym`, `checkpoint_format`: results codes int32 `[G, K / 8, 4]` (G = ceil(out
  / 4)), scales uint8 `[G, blocks, 4 * bytes]` and, for q4_k / gptq, extra uint8 (q6_k: extra
  and crumbs; the layout: ops/quant/nib_layout.py; multi-byte fields kept as little-endian
  bytes; q4_k's scales carry the extra operand's words in their spare bits too).
- `nib_matmul(x, codes, scales[, extra[, crumbs]])`, attrs `fmt`, `out`, `group`: x `[..., K]` @ W^T.
References decode with the layout's numpy decoder and multiply in float64.
"""
from __future__ import annotations

import numpy as np

from graphir.dtype import DType
from graphir.opdef import OpDef, register

from . import _rules as R
from .quant.gptq import resolve_group_size, unpack_cols
from .quant.gptq_layout import split_gptq_weight_bytes
from .quant.nib_layout import NIB_FORMATS, dequantize_nib, repack_gguf, repack_gptq

# Bytes per (row, block) of the scales and, where present, of the extra operand, per format.
SCALE_BYTES = {"q4_0": 2, "q4_1": 4, "q4_k": 2, "gptq": 2, "gptq_sym": 2, "q6_k": 1}
GGUF_FMT = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k", "Q6_K": "q6_k"}
_VIEW = {"q4_0": np.float16, "q4_1": np.uint32, "q4_k": np.uint16, "gptq": np.float16,
         "gptq_sym": np.float16, "q6_k": np.int8}


def nib_format(attrs) -> str:
    """The nib format a qmatmul's attrs map to, or None when its weight has no nib form."""
    enc = attrs.get("encoding")
    if enc in GGUF_FMT:
        return GGUF_FMT[enc]
    if enc == "GPTQ" and attrs.get("bits", 4) == 4 and not attrs.get("desc_act"):
        return "gptq_sym" if attrs.get("sym") else "gptq"
    return None


def _fmt(attrs, op: str) -> str:
    f = attrs.get("fmt")
    if f not in NIB_FORMATS:
        raise ValueError(f"{op}: fmt must be one of {NIB_FORMATS}, got {f!r}")
    return f


def _shapes(fmt: str, out: int, k: int, group: int) -> list[list[int]]:
    """[codes, scales(, extra)] shapes."""
    g = -(-out // 4)
    blocks = k // group if fmt.startswith("gptq") else k // (16 if fmt == "q6_k" else 32)
    shapes = [[g, k // 8, 4], [g, blocks, 4 * SCALE_BYTES[fmt]]]
    if fmt == "q4_k":
        shapes.append([g, k // 256, 16])
    elif fmt == "gptq":
        shapes.append([g, blocks, 4])
    elif fmt == "q6_k":
        shapes += [[g, k // 256, 8], [g, k // 16, 16]]
    return shapes


def _repack_rule(ins, attrs):
    fmt = _fmt(attrs, "nib_repack")
    w = R.tensor(ins[0], "weight")
    k = attrs.get("k")
    if not isinstance(k, int) or k <= 0 or k % 32:
        raise ValueError(f"nib_repack: k must be a positive multiple of 32, got {k!r}")
    if w.dtype is not DType.uint8 or w.rank != 2 or not all(d.is_static for d in w.shape):
        raise ValueError(f"nib_repack: weight must be static uint8 [rows, cols], got {w}")
    if fmt.startswith("gptq"):
        out, group = int(w.shape[1]), resolve_group_size(attrs["group_size"], k)
        if len(ins) != (2 if fmt == "gptq" else 1):
            raise ValueError(f"nib_repack: {fmt} takes the weight"
                             f"{' and qzeros' if fmt == 'gptq' else ''}, got {len(ins)} operands")
    else:
        out, group = int(w.shape[0]), 32
        if len(ins) != 1:
            raise ValueError(f"nib_repack: {fmt} takes the weight blocks, got {len(ins)} operands")
    if group % 32:
        raise ValueError(f"nib_repack: group size {group} is not a multiple of 32")
    return [R.like(w, dtype=DType.int32 if i == 0 else DType.uint8, shape=s)
            for i, s in enumerate(_shapes(fmt, out, k, group))]


def _bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8).reshape(a.shape[0], a.shape[1], -1)


def _repack_ref(ins, a):
    fmt, k = a["fmt"], a["k"]
    w = np.ascontiguousarray(ins[0])
    if fmt.startswith("gptq"):
        qweight, scales = split_gptq_weight_bytes(w, k, a["group_size"], 4)
        zeros = None if fmt == "gptq_sym" else unpack_cols(np.asarray(ins[1], np.int32), 4)
        arrs = repack_gptq(qweight, scales, zeros, a["checkpoint_format"] == "gptq")
        if fmt == "gptq_sym":
            arrs = arrs[:2]
    else:
        arrs = repack_gguf(w, a["encoding"], k)
    return [arrs[0]] + [_bytes(x) for x in arrs[1:]]


def _matmul_rule(ins, attrs):
    fmt = _fmt(attrs, "nib_matmul")
    out, group = attrs.get("out"), attrs.get("group", 32)
    if not isinstance(out, int) or out <= 0:
        raise ValueError(f"nib_matmul: out must be a positive int, got {out!r}")
    x = R.tensor(ins[0], "x")
    if x.rank < 1 or not x.dtype.is_float or not x.shape[-1].is_static:
        raise ValueError(f"nib_matmul: x must be a float tensor [..., K] with a static K, got {x}")
    k = int(x.shape[-1])
    want = _shapes(fmt, out, k, group)
    if len(ins) != 1 + len(want):
        raise ValueError(f"nib_matmul: {fmt} takes x and {len(want)} weight operands, got "
                         f"{len(ins) - 1}")
    for i, (t, shape) in enumerate(zip(ins[1:], want)):
        dt = DType.int32 if i == 0 else DType.uint8
        t = R.tensor(t, "weight operand")
        if t.dtype is not dt or [str(d) for d in t.shape] != [str(d) for d in shape]:
            raise ValueError(f"nib_matmul: {fmt} operand {i + 1} must be {dt.short} "
                             f"{R.fmt(shape)} for out={out}, K={k}, got {t}")
    R.same_device([R.tensor(t) for t in ins])
    return [R.like(x, shape=list(x.shape[:-1]) + [out])]


def nib_weight(fmt: str, out: int, ins, group: int = 32) -> np.ndarray:
    """float32 `[out, K]` of nib operands (codes, scales bytes[, extra bytes])."""
    codes = np.ascontiguousarray(ins[0], dtype=np.int32)
    scales = np.ascontiguousarray(ins[1]).view(_VIEW[fmt])
    extra = crumbs = None
    if fmt == "q4_k":
        # d / dmin from `supers`; the copy nib_repack puts in the scales' spare bits is for the
        # one-row GPU GEMV, which reads it only from nib_repack's operands (lowerings/quant.py).
        extra = np.ascontiguousarray(ins[2]).view(np.uint32)
    elif fmt == "gptq":
        extra = np.ascontiguousarray(ins[2])
    elif fmt == "q6_k":
        extra = np.ascontiguousarray(ins[2]).view(np.float16)
        crumbs = np.ascontiguousarray(ins[3]).view(np.int32)
    return dequantize_nib(fmt, out, codes, scales, extra, group, crumbs)


def _matmul_ref(ins, a):
    w = nib_weight(a["fmt"], a["out"], ins[1:], a.get("group", 32))
    return [np.asarray(ins[0], np.float64) @ w.astype(np.float64).T]


register(OpDef("nib_repack", _repack_rule, _repack_ref,
               attr_names=("encoding", "fmt", "k", "group_size", "sym", "checkpoint_format"),
               doc="4-bit weight -> nib layout (codes, scales[, extra]); load time on cuda"))
register(OpDef("nib_matmul", _matmul_rule, _matmul_ref, attr_names=("fmt", "out", "group"),
               doc="x [..., K] @ W^T for W in the nib layout: the cuda backend's form of a "
                   "4-bit qmatmul; other backends take it over nib_repack's results only, as "
                   "that qmatmul"))
