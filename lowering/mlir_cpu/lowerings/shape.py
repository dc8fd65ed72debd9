"""CPU lowerings of the shape ops: reshape, permute, broadcast_to, concat, split, slice, gather,
scatter and range.

Every kernel writes a fresh, contiguous result: views (collapse/expand, extract_slice) are only
read by a linalg copy, so bufferization never has to copy a strided memref (memref.copy of a
non-contiguous layout calls an MLIR runtime function the .so does not link).
"""
from __future__ import annotations

from mlir import ir
from mlir.dialects import arith, linalg, scf, tensor

from graphir.dim import Dim
from graphir.dtype import DType
from graphir.types import TensorType

from ...registry import register_lowering
from ..emit import DYN, Emitter, element_type, index, tensor_type

_IDX = ir.IndexType.get


def mixed(vals) -> tuple[list[ir.Value], list[int]]:
    """Split ints / index Values into (dynamic operands, static list with DYN placeholders)."""
    dyn, static = [], []
    for v in vals:
        if isinstance(v, int):
            static.append(v)
        else:
            dyn.append(v)
            static.append(DYN)
    return dyn, static


def copy(e: Emitter, src: ir.Value, out: TensorType, src_map: ir.AffineMap | None = None,
         init: ir.Value | None = None) -> ir.Value:
    """A linalg copy of src (read through src_map, identity by default) into a fresh tensor."""
    rank = out.rank
    maps = [src_map or e.identity_map(rank), e.identity_map(rank)]
    return e.generic([src], [init if init is not None else e.empty(out)], maps,
                     ["parallel"] * rank, lambda v: v[0])[0]


def extract_slice(src: ir.Value, offsets, sizes, strides, el: ir.Type) -> ir.Value:
    od, os_ = mixed(offsets)
    sd, ss = mixed(sizes)
    td, ts = mixed(strides)
    rt = ir.RankedTensorType.get(ss, el)
    return tensor.extract_slice(rt, src, od, sd, td, os_, ss, ts)


def insert_slice(src: ir.Value, dest: ir.Value, offsets, sizes) -> ir.Value:
    od, os_ = mixed(offsets)
    sd, ss = mixed(sizes)
    return tensor.insert_slice(src, dest, od, sd, [], os_, ss, [1] * len(ss))


def expand_shape(result: ir.RankedTensorType, x: ir.Value, groups: list[list[int]],
                 dyn: list[ir.Value], static: list[int]) -> ir.Value:
    """tensor.expand_shape, or tensor.reshape where a group would get more than one dynamic
    size: MLIR's expand-strided-metadata pass asserts on those (it killed the compiling
    process for a matmul over x [B, S, K] with B and S both symbolic)."""
    if all(sum(static[i] == DYN for i in g) <= 1 for g in groups):
        return tensor.expand_shape(result, x, groups, dyn, static)
    it = iter(dyn)
    sizes = [next(it) if d == DYN else index(d) for d in static]
    shape = tensor.from_elements(ir.RankedTensorType.get([len(sizes)], _IDX()), sizes)
    return tensor.reshape(result, x, shape)


def _to_1d(e: Emitter, x: ir.Value, t: TensorType) -> ir.Value:
    el = element_type(t.dtype, True)
    if t.rank == 0:
        return tensor.expand_shape(ir.RankedTensorType.get([1], el), x, [], [], [1])
    if t.rank == 1:
        return x
    n = 1
    for d in t.shape:
        n = n * int(d) if d.is_static and n != DYN else DYN
    return tensor.collapse_shape(ir.RankedTensorType.get([n], el), x, [list(range(t.rank))])


def _from_1d(e: Emitter, flat: ir.Value, out: TensorType) -> ir.Value:
    el = element_type(out.dtype, True)
    if out.rank == 0:
        one = tensor.cast(ir.RankedTensorType.get([1], el), flat)
        return tensor.collapse_shape(ir.RankedTensorType.get([], el), one, [])
    if out.rank == 1:
        return tensor.cast(tensor_type(out), flat)
    dyn, static = mixed(e.sizes(out))
    return expand_shape(tensor_type(out), flat, [list(range(out.rank))], dyn, static)


@register_lowering("reshape", "cpu")
def _reshape(e: Emitter, args):
    # The plan makes intermediate reshapes views (no kernel); a graph output gets this copy:
    # collapse to 1-D, expand to the result shape, copy.
    t, out = e.in_types[0], e.out_types[0]
    return [copy(e, _from_1d(e, _to_1d(e, args[0], t), out), out)]


@register_lowering("permute", "cpu")
def _permute(e: Emitter, args):
    out = e.out_types[0]
    rank = out.rank
    perm = [int(p) % rank for p in e.attrs["dims"]]
    inv = [0] * rank
    for i, p in enumerate(perm):
        inv[p] = i
    src_map = ir.AffineMap.get(rank, 0, [ir.AffineDimExpr.get(inv[k]) for k in range(rank)])
    return [copy(e, args[0], out, src_map)]


@register_lowering("broadcast_to", "cpu")
def _broadcast_to(e: Emitter, args):
    out = e.out_types[0]
    return [copy(e, args[0], out, e.broadcast_map(e.in_types[0], out))]


@register_lowering("concat", "cpu")
def _concat(e: Emitter, args):
    out = e.out_types[0]
    ax = int(e.attrs["axis"]) % out.rank
    el = element_type(out.dtype, True)
    dest = e.empty(out)
    offset = Dim(0)
    for x, t in zip(args, e.in_types):
        sizes = e.sizes(t)
        offsets = [0] * out.rank
        offsets[ax] = int(offset) if offset.is_static else e.dim(offset)
        # The copy writes straight into the destination's slice (in place after bufferization).
        part = extract_slice(dest, offsets, sizes, [1] * out.rank, el)
        piece = e.generic([x], [part], [e.identity_map(out.rank)] * 2, ["parallel"] * out.rank,
                          lambda v: v[0])[0]
        dest = insert_slice(piece, dest, offsets, sizes)
        offset = offset + t.shape[ax]
    return [dest]


@register_lowering("split", "cpu")
def _split(e: Emitter, args):
    t = e.in_types[0]
    ax = int(e.attrs["axis"]) % t.rank
    el = element_type(t.dtype, True)
    results, offset = [], Dim(0)
    for out in e.out_types:
        offsets = [0] * t.rank
        offsets[ax] = int(offset) if offset.is_static else e.dim(offset)
        view = extract_slice(args[0], offsets, e.sizes(out), [1] * t.rank, el)
        results.append(copy(e, view, out))
        offset = offset + out.shape[ax]
    return results


@register_lowering("slice", "cpu")
def _slice(e: Emitter, args):
    t, out = e.in_types[0], e.out_types[0]
    offsets = []
    for a, size in zip(e.attrs["starts"], t.shape):
        a = Dim(a)
        if a.is_static and int(a) < 0:  # python-style negative start
            a = size + int(a)
        offsets.append(int(a) if a.is_static else e.dim(a))
    steps = [int(s) for s in e.attrs["steps"]]
    view = extract_slice(args[0], offsets, e.sizes(out), steps, element_type(t.dtype, True))
    return [copy(e, view, out)]


def lindex(dim: int) -> ir.Value:
    """linalg.index: the current iteration index along dim (inside a generic body)."""
    return linalg.IndexOp(dim).result


def to_index(v: ir.Value, dt: DType) -> ir.Value:
    """An integer index value (storage type dt) as `index`."""
    if dt in (DType.uint32, DType.uint8):
        return arith.index_castui(_IDX(), v)
    return arith.index_cast(_IDX(), v)


def wrap_clamp(i: ir.Value, size: ir.Value) -> ir.Value:
    """numpy-style negative index wrap, then clamped into [0, size) so no read leaves the tensor
    (the interpreter raises on an out-of-range index; a kernel must not read out of bounds)."""
    zero = index(0)
    i = arith.select(arith.cmpi(arith.CmpIPredicate.slt, i, zero), arith.addi(i, size), i)
    i = arith.maxsi(i, zero)
    return arith.minsi(i, arith.subi(size, index(1)))


@register_lowering("gather", "cpu")
def _gather(e: Emitter, args):
    x, idx = args
    t, it = e.in_types
    out = e.out_types[0]
    ax = int(e.attrs["axis"]) % t.rank
    k = it.rank
    size = e.dim(t.shape[ax])  # created before the body: values in the body must not escape it
    idx_map = ir.AffineMap.get(out.rank, 0, [ir.AffineDimExpr.get(ax + j) for j in range(k)])

    def body(v):
        i = wrap_clamp(to_index(v[0], it.dtype), size)
        coords = ([lindex(d) for d in range(ax)] + [i]
                  + [lindex(ax + k + d) for d in range(t.rank - ax - 1)])
        return tensor.extract(x, coords)

    return e.generic([idx], [e.empty(out)], [idx_map, e.identity_map(out.rank)],
                     ["parallel"] * out.rank, body)


@register_lowering("scatter", "cpu")
def _scatter(e: Emitter, args):
    x, upd, idx = args
    t, _, it = e.in_types
    out = e.out_types[0]
    ax = int(e.attrs["axis"]) % t.rank
    size = e.dim(t.shape[ax])
    bounds = [e.dim(d) for d in it.shape]
    result = copy(e, x, out)
    one, zero = index(1), index(0)

    # Positions in C order, later writes win (what numpy's fancy assignment does).
    def nest(depth: int, acc: ir.Value, ivs: list) -> ir.Value:
        if depth == it.rank:
            i = wrap_clamp(to_index(tensor.extract(idx, ivs), it.dtype), size)
            pos = list(ivs)
            pos[ax] = i
            return tensor.insert(tensor.extract(upd, ivs), acc, pos)
        loop = scf.ForOp(zero, bounds[depth], one, [acc])
        with ir.InsertionPoint(loop.body):
            scf.YieldOp([nest(depth + 1, loop.inner_iter_args[0], ivs + [loop.induction_variable])])
        return loop.results[0]

    return [nest(0, result, [])]


@register_lowering("range", "cpu")
def _range(e: Emitter, args):
    out = e.out_types[0]
    dt = out.dtype
    start, step = e.attrs["start"], e.attrs["step"]
    exact_int = not dt.is_float and dt is not DType.bool and \
        all(float(v).is_integer() for v in (start, step))
    f64 = ir.F64Type.get()

    def body(_):
        i = lindex(0)
        if exact_int:
            el = element_type(dt, True)
            iv = arith.index_cast(el, i)
            return arith.addi(arith.constant(el, int(start)),
                              arith.muli(arith.constant(el, int(step)), iv))
        # The reference computes start + step * i in float64 and rounds once to the dtype.
        i64 = arith.index_cast(ir.IntegerType.get_signless(64), i)
        v = arith.addf(arith.constant(f64, float(start)),
                       arith.mulf(arith.constant(f64, float(step)), arith.sitofp(f64, i64)))
        if dt is DType.bool:
            return arith.extui(ir.IntegerType.get_signless(8),
                               arith.cmpf(arith.CmpFPredicate.UNE, v, arith.constant(f64, 0.0)))
        if dt.is_float:
            if dt is DType.float32 or dt is DType.float16:
                return arith.truncf(element_type(dt), v)
            return arith.truncf(element_type(dt), arith.truncf(ir.F32Type.get(), v))
        el = element_type(dt, True)
        return arith.fptoui(el, v) if dt in (DType.uint8, DType.uint32) else arith.fptosi(el, v)

    return e.generic([], [e.empty(out)], [e.identity_map(1)], ["parallel"], body)
