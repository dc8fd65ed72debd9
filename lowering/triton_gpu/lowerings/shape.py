"""Shape ops on cuda: generic strided-copy, gather and scatter kernels (rank <= 6).

Every data-movement op is a copy between two strided views over one iteration shape:
permute (source strides permuted), broadcast_to (zero strides), slice (offset, strides times
steps), split (one copy per piece), concat (one copy per input into an offset of the output).
Sizes and strides are runtime int64s (symbolic dims allowed); contiguous same-shape copies
(reshape that is not a view, transfer_to) are plain memcpys, which the runtime turns into peer
copies when they cross devices. allreduce / allgather over several devices become "collective"
steps that the runtime carries out (NCCL on GPUs); over one device they are copies.
"""
from __future__ import annotations

import triton
import triton.language as tl

from graphir.dim import Dim
from graphir.lowering.registry import register_lowering
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait

from .base import StepBuilder, e, numel, strides, ttype

MAX_RANK = 6
BLOCK = 1024


@triton.jit
def _coords(i, d1, d2, d3, d4, d5):
    c5 = i % d5
    i = i // d5
    c4 = i % d4
    i = i // d4
    c3 = i % d3
    i = i // d3
    c2 = i % d2
    i = i // d2
    c1 = i % d1
    return i // d1, c1, c2, c3, c4, c5


@triton.jit
def strided_copy_kernel(src_ptr, dst_ptr, n, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5,
                        t0, t1, t2, t3, t4, t5, BLOCK: tl.constexpr):
    pdl_wait()
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c0, c1, c2, c3, c4, c5 = _coords(i, d1, d2, d3, d4, d5)
    src = c0 * s0 + c1 * s1 + c2 * s2 + c3 * s3 + c4 * s4 + c5 * s5
    dst = c0 * t0 + c1 * t1 + c2 * t2 + c3 * t3 + c4 * t4 + c5 * t5
    tl.store(dst_ptr + dst, tl.load(src_ptr + src, mask=m), mask=m)


@triton.jit
def gather_kernel(x_ptr, idx_ptr, out_ptr, n, I, Q, A, BLOCK: tl.constexpr):
    pdl_wait()
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    q = i % Q
    j = (i // Q) % I
    p = i // (Q * I)
    k = tl.load(idx_ptr + j, mask=m, other=0).to(tl.int64)
    k = tl.where(k < 0, k + A, k)
    tl.store(out_ptr + i, tl.load(x_ptr + (p * A + k) * Q + q, mask=m), mask=m)


@triton.jit
def scatter_kernel(upd_ptr, idx_ptr, out_ptr, n, d1, d2, d3, d4, d5, t0, t1, t2, t3, t4, t5,
                   A, AX: tl.constexpr, BLOCK: tl.constexpr):
    pdl_wait()
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c0, c1, c2, c3, c4, c5 = _coords(i, d1, d2, d3, d4, d5)
    k = tl.load(idx_ptr + i, mask=m, other=0).to(tl.int64)
    k = tl.where(k < 0, k + A, k)
    if AX == 0:
        c0 = k
    elif AX == 1:
        c1 = k
    elif AX == 2:
        c2 = k
    elif AX == 3:
        c3 = k
    elif AX == 4:
        c4 = k
    else:
        c5 = k
    dst = c0 * t0 + c1 * t1 + c2 * t2 + c3 * t3 + c4 * t4 + c5 * t5
    tl.store(out_ptr + dst, tl.load(upd_ptr + i, mask=m), mask=m)


def _ints(names):
    return {n: "i64" for n in names}


def copy_spec(dtype: str) -> KernelSpec:
    sig = {"src_ptr": f"*{dtype}", "dst_ptr": f"*{dtype}", "n": "i64",
           **_ints(f"d{k}" for k in range(1, 6)), **_ints(f"s{k}" for k in range(6)),
           **_ints(f"t{k}" for k in range(6)), "BLOCK": "constexpr"}
    return KernelSpec(f"strided_copy_{dtype}", strided_copy_kernel, sig, {"BLOCK": BLOCK}, 4, 1,
                      lambda n: (-(-n // BLOCK), 1, 1), ("n",))


def _pad(dims, fill):
    dims = list(dims)
    if len(dims) > MAX_RANK:
        raise ValueError(f"cuda shape kernels support rank <= {MAX_RANK}, got rank {len(dims)}")
    return [fill] * (MAX_RANK - len(dims)) + dims


def strided_copy(sb: StepBuilder, src, src_off, src_strides, dst, dst_off, dst_strides,
                 shape) -> None:
    """dst[dst_off + c . dst_strides] = src[src_off + c . src_strides] for c over shape."""
    key = sb.kernel(copy_spec(ttype(src.type.dtype)))
    n = e(numel(shape))
    dims = [e(d) for d in _pad(shape, Dim(1))]
    ss = [e(s) for s in _pad(src_strides, Dim(0))]
    ts = [e(s) for s in _pad(dst_strides, Dim(0))]
    sb.launch(key, [f"cdiv({n}, {BLOCK})"],
              [sb.ptr(src, src_off), sb.ptr(dst, dst_off), n, *dims[1:], *ss, *ts])


def memcpy(sb: StepBuilder, src, dst) -> None:
    nbytes = numel(dst.type.shape) * dst.type.dtype.size_in_bytes
    sb.copy(sb.ptr(dst), sb.ptr(src), nbytes)


@register_lowering("reshape", "cuda")
@register_lowering("transfer_to", "cuda")
def _copy(sb: StepBuilder, node) -> None:
    memcpy(sb, node.operands[0], node.results[0])


@register_lowering("permute", "cuda")
def _permute(sb: StepBuilder, node) -> None:
    x, out = node.operands[0], node.results[0]
    st = strides(x.type.shape)
    perm = [int(p) % max(x.type.rank, 1) for p in node.attrs["dims"]]
    strided_copy(sb, x, 0, [st[p] for p in perm], out, 0, strides(out.type.shape),
                 out.type.shape)


@register_lowering("broadcast_to", "cuda")
def _broadcast_to(sb: StepBuilder, node) -> None:
    x, out = node.operands[0], node.results[0]
    r, k = out.type.rank, x.type.rank
    st = strides(x.type.shape)
    src = []
    for j in range(r):
        i = j - (r - k)
        src.append(Dim(0) if i < 0 or (x.type.shape[i] == Dim(1) and out.type.shape[j] != Dim(1))
                   else st[i])
    strided_copy(sb, x, 0, src, out, 0, strides(out.type.shape), out.type.shape)


@register_lowering("slice", "cuda")
def _slice(sb: StepBuilder, node) -> None:
    x, out = node.operands[0], node.results[0]
    st = strides(x.type.shape)
    a = node.attrs
    off = Dim(0)
    for s, start in zip(st, a["starts"]):
        off = off + s * Dim(start)
    src = [s * int(step) for s, step in zip(st, a["steps"])]
    strided_copy(sb, x, off, src, out, 0, strides(out.type.shape), out.type.shape)


@register_lowering("split", "cuda")
def _split(sb: StepBuilder, node) -> None:
    x = node.operands[0]
    ax = node.attrs["axis"] % x.type.rank
    st = strides(x.type.shape)
    start = Dim(0)
    for r in node.results:
        strided_copy(sb, x, start * st[ax], st, r, 0, strides(r.type.shape), r.type.shape)
        start = start + r.type.shape[ax]


@register_lowering("concat", "cuda")
def _concat(sb: StepBuilder, node) -> None:
    out = node.results[0]
    ax = node.attrs["axis"] % out.type.rank
    ost = strides(out.type.shape)
    start = Dim(0)
    for x in node.operands:
        strided_copy(sb, x, 0, strides(x.type.shape), out, start * ost[ax], ost, x.type.shape)
        start = start + x.type.shape[ax]


@register_lowering("gather", "cuda")
def _gather(sb: StepBuilder, node) -> None:
    x, idx = node.operands
    out = node.results[0]
    ax = node.attrs["axis"] % x.type.rank
    dt = ttype(x.type.dtype)
    sig = {"x_ptr": f"*{dt}", "idx_ptr": f"*{ttype(idx.type.dtype)}", "out_ptr": f"*{dt}",
           "n": "i64", "I": "i64", "Q": "i64", "A": "i64", "BLOCK": "constexpr"}
    spec = KernelSpec(f"gather_{dt}", gather_kernel, sig, {"BLOCK": BLOCK}, 4, 1,
                      lambda n: (-(-n // BLOCK), 1, 1), ("n",))
    n = e(numel(out.type.shape))
    sb.launch(sb.kernel(spec), [f"cdiv({n}, {BLOCK})"],
              [sb.ptr(x), sb.ptr(idx), sb.ptr(out), n, e(numel(idx.type.shape)),
               e(numel(x.type.shape[ax + 1:])), e(x.type.shape[ax])])


@register_lowering("scatter", "cuda")
def _scatter(sb: StepBuilder, node) -> None:
    x, upd, idx = node.operands
    out = node.results[0]
    r = x.type.rank
    ax = node.attrs["axis"] % r
    memcpy(sb, x, out)
    dt = ttype(x.type.dtype)
    sig = {"upd_ptr": f"*{dt}", "idx_ptr": f"*{ttype(idx.type.dtype)}", "out_ptr": f"*{dt}",
           "n": "i64", **_ints(f"d{k}" for k in range(1, 6)), **_ints(f"t{k}" for k in range(6)),
           "A": "i64", "AX": "constexpr", "BLOCK": "constexpr"}
    pad_ax = ax + MAX_RANK - r
    spec = KernelSpec(f"scatter_{dt}_ax{pad_ax}", scatter_kernel, sig,
                      {"AX": pad_ax, "BLOCK": BLOCK}, 4, 1, lambda n: (-(-n // BLOCK), 1, 1),
                      ("n",))
    n = e(numel(idx.type.shape))
    dims = [e(d) for d in _pad(idx.type.shape, Dim(1))]
    ts = [e(s) for s in _pad(strides(x.type.shape), Dim(0))]
    sb.launch(sb.kernel(spec), [f"cdiv({n}, {BLOCK})"],
              [sb.ptr(upd), sb.ptr(idx), sb.ptr(out), n, *dims[1:], *ts, e(x.type.shape[ax])])


def _collective(op: str):
    def lower(sb: StepBuilder, node) -> None:
        if len(node.operands) == 1 and node.attrs.get("world_size") is None:
            memcpy(sb, node.operands[0], node.results[0])
            return
        # Several devices, or one process's part of a collective over processes
        # (world_size): the runtime runs it (NCCL on GPUs) from the step's values.
        sb.collective = {"axis": int(node.attrs.get("axis", 0))}
    return lower


register_lowering("allreduce", "cuda")(_collective("allreduce"))
register_lowering("allgather", "cuda")(_collective("allgather"))
