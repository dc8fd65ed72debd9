"""Reductions, softmax, row norms and the generic (batched, strided) matmul on cuda.

Reductions and softmax see their input as [P, R, Q] (R the reduced axis) and run one program
per (p, block of q) looping over R; accumulation is fp32 for floats (int64 for integers).
These ops are rare on the hot path of attention layers, so the kernels favour generality.
"""
from __future__ import annotations

import triton
import triton.language as tl

from graphir.dim import Dim
from graphir.dtype import DType
from graphir.lowering.registry import register_lowering
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec, next_pow2

from graphir.lowering.triton_gpu.kernels import rms_norm as rn
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

from .base import StepBuilder, e, numel, static_int, strides, ttype
from .common import MM_DTYPES

OPS = {"sum": 0, "mean": 1, "reduce_max": 2, "reduce_min": 3, "argmax": 4}
BQ, BR = 16, 64


@triton.jit
def reduce_kernel(x_ptr, out_ptr, P, R, Q, OP: tl.constexpr, FLOAT: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    pdl_wait()
    p = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qm = q < Q
    acc_t = tl.float32 if FLOAT else tl.int64
    if OP == 2:
        acc = tl.full((BLOCK_Q,), float("-inf") if FLOAT else -2**62, acc_t)
    elif OP == 3:
        acc = tl.full((BLOCK_Q,), float("inf") if FLOAT else 2**62, acc_t)
    elif OP == 4:
        acc = tl.full((BLOCK_Q,), float("-inf") if FLOAT else -2**62, acc_t)
    else:
        acc = tl.zeros((BLOCK_Q,), acc_t)
    best = tl.zeros((BLOCK_Q,), tl.int64)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < R)[:, None] & qm[None, :]
        x = tl.load(x_ptr + (p * R + r[:, None]) * Q + q[None, :], mask=m).to(acc_t)
        if OP == 2 or OP == 4:
            x = tl.where(m, x, float("-inf") if FLOAT else -2**62)
            cmax = tl.max(x, 0)
            if OP == 4:
                first = tl.min(tl.where(x == cmax[None, :], r[:, None], R), 0).to(tl.int64)
                best = tl.where(cmax > acc, first, best)
            acc = tl.maximum(acc, cmax)
        elif OP == 3:
            acc = tl.minimum(acc, tl.min(tl.where(m, x, float("inf") if FLOAT else 2**62), 0))
        else:
            acc += tl.sum(tl.where(m, x, 0), 0)
    if OP == 1:
        acc = acc / R
    if OP == 4:
        tl.store(out_ptr + p * Q + q, best, mask=qm)
    else:
        tl.store(out_ptr + p * Q + q, acc.to(out_ptr.dtype.element_ty), mask=qm)


@triton.jit
def softmax_kernel(x_ptr, out_ptr, R, Q, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    pdl_wait()
    p = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qm = q < Q
    mx = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < R)[:, None] & qm[None, :]
        x = tl.load(x_ptr + (p * R + r[:, None]) * Q + q[None, :], mask=m, other=float("-inf"))
        mx = tl.maximum(mx, tl.max(x.to(tl.float32), 0))
    s = tl.zeros((BLOCK_Q,), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < R)[:, None] & qm[None, :]
        x = tl.load(x_ptr + (p * R + r[:, None]) * Q + q[None, :], mask=m, other=float("-inf"))
        s += tl.sum(tl.exp(x.to(tl.float32) - mx[None, :]), 0)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < R)[:, None] & qm[None, :]
        offs = (p * R + r[:, None]) * Q + q[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=float("-inf"))
        y = tl.exp(x.to(tl.float32) - mx[None, :]) / s[None, :]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def row_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, D, eps, offset, LAYER: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_D)
    cm = c < D
    x = tl.load(x_ptr + row * D + c, mask=cm, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    if LAYER:
        mu = tl.sum(x, 0) / D
        xc = tl.where(cm, x - mu, 0.0)
        y = xc * tl.rsqrt(tl.sum(xc * xc, 0) / D + eps) * w
        y += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    else:
        y = x * tl.rsqrt(tl.sum(x * x, 0) / D + eps) * (w + offset)
    tl.store(y_ptr + row * D + c, y.to(y_ptr.dtype.element_ty), mask=cm)


@triton.jit
def bmm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               IEEE: tl.constexpr):
    pdl_wait()
    bt = tl.program_id(2).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(a_ptr + bt * sab + rm[:, None].to(tl.int64) * sam + k[None, :] * sak,
                    mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + bt * sbb + k[:, None].to(tl.int64) * sbk + rn[None, :] * sbn,
                    mask=(k[:, None] < K) & (rn[None, :] < N), other=0.0)
        if IEEE:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    c = c_ptr + bt * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _prq(shape, axis):
    return numel(shape[:axis]), shape[axis], numel(shape[axis + 1:])


def _reduce(sb: StepBuilder, node) -> None:
    x, out = node.operands[0], node.results[0]
    ax = node.attrs["axis"] % x.type.rank
    P, R, Q = _prq(x.type.shape, ax)
    fl = x.type.dtype.is_float
    if x.type.dtype is DType.bool:
        raise ValueError(f"gir.{node.op} on cuda: bool input is not supported")
    sig = {"x_ptr": f"*{ttype(x.type.dtype)}", "out_ptr": f"*{ttype(out.type.dtype)}",
           "P": "i64", "R": "i64", "Q": "i64", "OP": "constexpr", "FLOAT": "constexpr",
           "BLOCK_R": "constexpr", "BLOCK_Q": "constexpr"}
    spec = KernelSpec(f"reduce_{node.op}_{ttype(x.type.dtype)}", reduce_kernel, sig,
                      {"OP": OPS[node.op], "FLOAT": fl, "BLOCK_R": BR, "BLOCK_Q": BQ}, 4, 1,
                      lambda P, Q: (P, -(-Q // BQ), 1), ("P", "Q"))
    sb.launch(sb.kernel(spec), [e(P), f"cdiv({e(Q)}, {BQ})"],
              [sb.ptr(x), sb.ptr(out), e(P), e(R), e(Q)])


for _op in OPS:
    register_lowering(_op, "cuda")(_reduce)


@register_lowering("softmax", "cuda")
def _softmax(sb: StepBuilder, node) -> None:
    x, out = node.operands[0], node.results[0]
    P, R, Q = _prq(x.type.shape, node.attrs["axis"] % x.type.rank)
    t = ttype(x.type.dtype)
    sig = {"x_ptr": f"*{t}", "out_ptr": f"*{t}", "R": "i64", "Q": "i64",
           "BLOCK_R": "constexpr", "BLOCK_Q": "constexpr"}
    spec = KernelSpec(f"softmax_{t}", softmax_kernel, sig, {"BLOCK_R": BR, "BLOCK_Q": BQ}, 4, 1,
                      lambda P, Q: (P, -(-Q // BQ), 1), ("P", "Q"))
    sb.launch(sb.kernel(spec), [e(P), f"cdiv({e(Q)}, {BQ})"],
              [sb.ptr(x), sb.ptr(out), e(R), e(Q)])


@register_lowering("layer_norm", "cuda")
def lower_row_norm(sb: StepBuilder, node) -> None:
    """rms_norm (with weight_offset, or dtypes the hand-written kernel lacks) and layer_norm."""
    x, w = node.operands[:2]
    layer = node.op == "layer_norm"
    D = static_int(x.type.shape[-1], f"the normalized axis of gir.{node.op}")
    bd = next_pow2(D)
    t = ttype(x.type.dtype)
    sig = {"x_ptr": f"*{t}", "w_ptr": f"*{ttype(w.type.dtype)}",
           "b_ptr": f"*{ttype(node.operands[-1].type.dtype)}", "y_ptr": f"*{t}", "D": "i32",
           "eps": "fp32", "offset": "fp32", "LAYER": "constexpr", "BLOCK_D": "constexpr"}
    spec = KernelSpec(f"{node.op}_{t}_d{D}", row_norm_kernel, sig,
                      {"LAYER": layer, "BLOCK_D": bd}, 4 if bd <= 4096 else 8, 1,
                      lambda R: (R, 1, 1), ("R",))
    R = e(numel(x.type.shape[:-1]))
    sb.launch(sb.kernel(spec), [R],
              [sb.ptr(x), sb.ptr(w), sb.ptr(node.operands[-1]), sb.ptr(node.results[0]), D,
               float(node.attrs["epsilon"]), float(node.attrs.get("weight_offset") or 0.0)])


def lower_generic_matmul(sb: StepBuilder, node) -> None:
    """Batched matmul with transposes as strides; batch dims broadcast when one side has a
    single batch (or both have the same batch shape)."""
    a, b = node.operands
    out = node.results[0]
    if not a.type.dtype.is_float:
        raise ValueError(f"gir.matmul on cuda needs float operands, got {a.type.dtype.short}")
    ash = list(a.type.shape) if a.type.rank >= 2 else [Dim(1)] + list(a.type.shape)
    bsh = list(b.type.shape)
    ast_, bst = strides(ash), strides(bsh)
    M, K = (ash[-2], ash[-1])
    sam, sak = ast_[-2], ast_[-1]
    if node.attrs.get("transpose_a"):
        M, K, sam, sak = ash[-1], ash[-2], ast_[-1], ast_[-2]
    N, sbk, sbn = bsh[-1], bst[-2], bst[-1]
    if node.attrs.get("transpose_b"):
        N, sbk, sbn = bsh[-2], bst[-1], bst[-2]
    ba, bb = numel(ash[:-2]), numel(bsh[:-2])
    nb = numel(out.type.shape[:-2]) if a.type.rank >= 2 else numel(out.type.shape[:-1])
    if not (ba == nb or ba == Dim(1)) or not (bb == nb or bb == Dim(1)) \
            or (ba == nb and bb == nb and list(ash[:-2]) != list(bsh[:-2]) and bb != Dim(1)):
        raise ValueError(f"gir.matmul on cuda: batch dims of {a.type} and {b.type} broadcast "
                         f"in a way the generic kernel does not support")
    sab = Dim(0) if ba == Dim(1) else M * K
    sbb = Dim(0) if bb == Dim(1) else K * N
    t = ttype(a.type.dtype)
    ieee = a.type.dtype is DType.float32
    sig = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "c_ptr": f"*{t}", "M": "i32", "N": "i32",
           "K": "i32", **{s: "i64" for s in ("sab", "sam", "sak", "sbb", "sbk", "sbn")},
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
           "IEEE": "constexpr"}
    spec = KernelSpec(f"bmm_{t}", bmm_kernel, sig,
                      {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "IEEE": ieee}, 4, 2,
                      lambda M, N, B: (-(-M // 64), -(-N // 64), B), ("M", "N", "B"))
    sb.launch(sb.kernel(spec), [f"cdiv({e(M)}, 64)", f"cdiv({e(N)}, 64)", e(nb)],
              [sb.ptr(a), sb.ptr(b), sb.ptr(out), e(M), e(N), e(K),
               e(sab), e(sam), e(sak), e(sbb), e(sbk), e(sbn)])


@register_lowering("rms_norm", "cuda")
def _rms_norm(sb: StepBuilder, node) -> None:
    x, w = node.operands
    D = static_int(x.type.shape[-1], "the normalized axis of gir.rms_norm")
    if node.attrs.get("weight_offset") or x.type.dtype not in MM_DTYPES \
            or w.type.dtype not in MM_DTYPES:
        lower_row_norm(sb, node)
        return
    (spec,) = rn.aot_specs(D, MM_DTYPES[x.type.dtype], MM_DTYPES[w.type.dtype])
    key = sb.kernel(spec)
    R = e(numel(x.type.shape[:-1]))
    br = spec.constexprs["BLOCK_R"]
    sb.launch(key, [f"cdiv({R}, {br})"],
              [sb.ptr(x), sb.ptr(w), sb.ptr(node.results[0]), R, D, D, D,
               float(node.attrs["epsilon"])])
