"""CPU lowerings of the reductions (sum, mean, reduce_max, reduce_min, argmax), softmax, rms_norm
and layer_norm.

A reduction is one linalg.generic whose iteration space is the input's shape in its own order:
reducing the last axis makes the innermost loop the reduction (float adds carry the `reassoc`
flag, so LLVM vectorizes sums; it does not vectorize min/max into an accumulator in memory, so
those stay scalar), reducing another axis keeps the innermost loop parallel and contiguous.
Narrow floats accumulate in f32 and round once; ints accumulate in their own type (the
interpreter's sum wraps the same way), except mean, which sums in i64.
softmax makes three passes (max; exp stored in f32 while summed; scale), computing exp once with
an arith-only polynomial LLVM vectorizes (libm's expf is a scalar call); rms_norm makes two
passes, layer_norm three.
"""
from __future__ import annotations

from mlir import ir
from mlir.dialects import arith, linalg, math, tensor

from graphir.dtype import DType
from graphir.types import TensorType

from ...registry import register_lowering
from ..emit import Emitter, element_type
from .elementwise import to_compute, to_storage
from .shape import lindex

def _fm():
    return ir.Attribute.parse("#arith.fastmath<reassoc,contract>")


def _is_unsigned(dt: DType) -> bool:
    return dt in (DType.uint8, DType.uint32, DType.bool)


def acc_type(dt: DType) -> ir.Type:
    """The element type a reduction of dt accumulates in."""
    return ir.F32Type.get() if dt.is_float else element_type(dt, True)


def reduced(t: TensorType, ax: int) -> TensorType:
    shape = list(t.shape)
    shape[ax] = 1
    return TensorType(t.dtype, shape, t.device)


def acc_map(rank: int, ax: int) -> ir.AffineMap:
    """Map of a keep-dims [.., 1, ..] operand into the input's iteration space."""
    return ir.AffineMap.get(rank, 0, [ir.AffineExpr.get_constant(0) if d == ax else
                                      ir.AffineDimExpr.get(d) for d in range(rank)])


def filled(e: Emitter, t: TensorType, el: ir.Type, value) -> ir.Value:
    empty = tensor.EmptyOp(e.sizes(t), el).result
    return linalg.fill(arith.constant(el, value), outs=[empty])


def reduce_axis(e: Emitter, inputs, ax: int, inits, combine) -> list[ir.Value]:
    """Reduce over axis ax. inputs: [(value, type)], the first full, the others keep-dims;
    inits: [(element type, initial value)]; combine(input block args, accumulators) -> new accs."""
    t = inputs[0][1]
    rank = t.rank
    maps = [e.identity_map(rank)] + [acc_map(rank, ax)] * (len(inputs) - 1 + len(inits))
    iters = ["reduction" if d == ax else "parallel" for d in range(rank)]
    kept = reduced(t, ax)
    outs = [filled(e, kept, el, v) for el, v in inits]
    n = len(inputs)
    return e.generic([v for v, _ in inputs], outs, maps, iters,
                     lambda a: combine(a[:n], a[n:]))


def exp_f32(x: ir.Value) -> ir.Value:
    """exp on f32 from arith ops only (LLVM vectorizes it; a libm call it would not).

    x = k*ln2 + r with |r| <= ln2/2; e^r by its degree-7 Taylor polynomial; 2^k built in the
    exponent bits. Within 1.3 ulp on [-87, 88]; 0 below -87, +inf above 88 (softmax feeds it
    x - max <= 0, where the flush to 0 is far below f32 rounding of the sum)."""
    f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)

    def c(v):
        return arith.constant(f32, v)
    xc = arith.minimumf(arith.maximumf(x, c(-87.0)), c(88.0))
    k = math.floor(arith.addf(arith.mulf(xc, c(1.4426950408889634)), c(0.5)))
    r = arith.subf(arith.subf(xc, arith.mulf(k, c(0.693145751953125))),
                   arith.mulf(k, c(1.428606765330187e-06)))
    p = c(1.0 / 5040)
    for coef in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = arith.addf(arith.mulf(p, r), c(coef))
    bits = arith.shli(arith.addi(arith.fptosi(i32, k), arith.constant(i32, 127)),
                      arith.constant(i32, 23))
    y = arith.mulf(p, arith.bitcast(f32, bits))
    y = arith.select(arith.cmpf(arith.CmpFPredicate.OLT, x, c(-87.0)), c(0.0), y)
    y = arith.select(arith.cmpf(arith.CmpFPredicate.OGT, x, c(88.0)), c(float("inf")), y)
    return arith.select(arith.cmpf(arith.CmpFPredicate.UNO, x, x), x, y)


def finish(e: Emitter, acc: ir.Value, out: TensorType, fn=None) -> ir.Value:
    """Elementwise pass over a (small) accumulator: fn(value) then round to out's dtype."""
    def body(v):
        x = fn(v[0]) if fn else v[0]
        return to_storage(x, out.dtype) if out.dtype.is_float else x
    return e.generic([acc], [e.empty(out)], [e.identity_map(out.rank)] * 2,
                     ["parallel"] * out.rank, body)[0]


def _addf(a, b):
    return arith.addf(a, b, fastmath=_fm())


def fmax(x: ir.Value, acc: ir.Value) -> ir.Value:
    """NaN-propagating max as compare + select (arith.maximumf becomes branches on x86)."""
    take = arith.ori(arith.cmpf(arith.CmpFPredicate.OGT, x, acc),
                     arith.cmpf(arith.CmpFPredicate.UNO, x, x))
    return arith.select(take, x, acc)


def fmin(x: ir.Value, acc: ir.Value) -> ir.Value:
    take = arith.ori(arith.cmpf(arith.CmpFPredicate.OLT, x, acc),
                     arith.cmpf(arith.CmpFPredicate.UNO, x, x))
    return arith.select(take, x, acc)


def _combine_op(op: str, dt: DType):
    if dt.is_float:
        return {"sum": _addf, "mean": _addf, "reduce_max": fmax, "reduce_min": fmin}[op]
    if dt is DType.bool:  # any / all: a sum or mean that is nonzero is True
        return arith.minui if op == "reduce_min" else arith.maxui
    u = _is_unsigned(dt)
    return {"sum": arith.addi, "mean": arith.addi, "reduce_max": arith.maxui if u else arith.maxsi,
            "reduce_min": arith.minui if u else arith.minsi}[op]


def _init(op: str, dt: DType):
    if dt.is_float:
        return {"reduce_max": float("-inf"), "reduce_min": float("inf")}.get(op, 0.0)
    if dt is DType.bool:
        return 1 if op == "reduce_min" else 0
    bits = 8 * dt.size_in_bytes
    if op == "reduce_max":
        return 0 if _is_unsigned(dt) else -(1 << (bits - 1))
    if op == "reduce_min":
        return -1 if _is_unsigned(dt) else (1 << (bits - 1)) - 1  # all ones = unsigned max
    return 0


def _register_reduce(op: str):
    @register_lowering(op, "cpu")
    def lower(e: Emitter, args):
        t, out = e.in_types[0], e.out_types[0]
        ax = int(e.attrs["axis"]) % t.rank
        dt = t.dtype
        f = _combine_op(op, dt)
        int_mean = op == "mean" and not dt.is_float and dt is not DType.bool
        el = ir.IntegerType.get_signless(64) if int_mean else acc_type(dt)

        def combine(xs, accs):
            x = to_compute(xs[0], dt) if dt.is_float else xs[0]
            if int_mean:
                x = (arith.extui if _is_unsigned(dt) else arith.extsi)(el, x) \
                    if dt.size_in_bytes < 8 else x
            return f(x, accs[0])

        (acc,) = reduce_axis(e, [(args[0], t)], ax, [(el, _init(op, dt))], combine)
        if op == "mean" and dt.is_float:
            n = arith.uitofp(ir.F32Type.get(), arith.index_cast(ir.IntegerType.get_signless(64),
                                                               e.dim(t.shape[ax])))
            return [finish(e, acc, out, lambda v: arith.divf(v, n))]
        if int_mean:
            n = arith.index_cast(el, e.dim(t.shape[ax]))
            div = arith.divui if _is_unsigned(dt) else arith.divsi  # truncates, as np.trunc
            st = element_type(dt, True)
            return [finish(e, acc, out, lambda v: _narrow(div(v, n), st))]
        if dt.is_float and dt is not DType.float32:
            return [finish(e, acc, out)]
        return [acc]


def _narrow(v: ir.Value, st: ir.Type) -> ir.Value:
    return v if v.type == st else arith.trunci(st, v)


for _op in ("sum", "mean", "reduce_max", "reduce_min"):
    _register_reduce(_op)


@register_lowering("argmax", "cpu")
def _argmax(e: Emitter, args):
    t = e.in_types[0]
    ax = int(e.attrs["axis"]) % t.rank
    dt = t.dtype
    i64 = ir.IntegerType.get_signless(64)

    def combine(xs, accs):
        best, bi = accs
        j = arith.index_cast(i64, lindex(ax))
        if dt.is_float:
            x = to_compute(xs[0], dt)
            # First maximum wins; a NaN beats everything and the first NaN stays (numpy).
            nan_x = arith.cmpf(arith.CmpFPredicate.UNO, x, x)
            ord_best = arith.cmpf(arith.CmpFPredicate.ORD, best, best)
            take = arith.ori(arith.cmpf(arith.CmpFPredicate.OGT, x, best),
                             arith.andi(nan_x, ord_best))
        else:
            x = xs[0]
            pred = arith.CmpIPredicate.ugt if _is_unsigned(dt) else arith.CmpIPredicate.sgt
            take = arith.cmpi(pred, x, best)
        return [arith.select(take, x, best), arith.select(take, j, bi)]

    el = acc_type(dt)
    first = float("-inf") if dt.is_float else _init("reduce_max", dt)
    # Index 0 with the smallest value: if nothing beats it, the first element was a maximum.
    _, idx = reduce_axis(e, [(args[0], t)], ax, [(el, first), (i64, 0)], combine)
    return [idx]


def _row_scalar(e: Emitter, acc: ir.Value, kept: TensorType, fn) -> ir.Value:
    """fn over a keep-dims f32 accumulator, result f32 (per-row statistics)."""
    def body(v):
        return fn(v[0])
    return e.generic([acc], [_f32_empty(e, kept)], [e.identity_map(kept.rank)] * 2,
                     ["parallel"] * kept.rank, body)[0]


def _f32_empty(e: Emitter, t: TensorType) -> ir.Value:
    return tensor.EmptyOp(e.sizes(t), ir.F32Type.get()).result


def _count(e: Emitter, d) -> ir.Value:
    return arith.uitofp(ir.F32Type.get(),
                        arith.index_cast(ir.IntegerType.get_signless(64), e.dim(d)))


def _map_rows(e: Emitter, inputs, out: TensorType, ax: int, fn) -> ir.Value:
    """Elementwise pass over out's shape; inputs [(value, kind)] with kind 'full', 'row' (keep-dims
    over ax) or 'vec' (a [N] vector along the last axis); fn(compute values) -> f32."""
    rank = out.rank
    maps = []
    for _, kind in inputs:
        maps.append({"full": e.identity_map(rank), "row": acc_map(rank, ax),
                     "vec": ir.AffineMap.get(rank, 0, [ir.AffineDimExpr.get(rank - 1)])}[kind])
    maps.append(e.identity_map(rank))
    return e.generic([v for v, _ in inputs], [e.empty(out)], maps, ["parallel"] * rank,
                     lambda v: to_storage(fn(v[:-1]), out.dtype))[0]


@register_lowering("softmax", "cpu")
def _softmax(e: Emitter, args):
    t = e.in_types[0]
    dt = t.dtype
    ax = int(e.attrs["axis"]) % t.rank
    kept = reduced(t, ax)
    x = args[0]
    f32 = ir.F32Type.get()
    rank = t.rank
    iters = ["reduction" if d == ax else "parallel" for d in range(rank)]
    ident, row = e.identity_map(rank), acc_map(rank, ax)

    (m,) = reduce_axis(e, [(x, t)], ax, [(f32, float("-inf"))],
                       lambda xs, a: [fmax(to_compute(xs[0], dt), a[0])])

    # exp once: the second pass stores exp(x - max) (f32) while it sums it.
    def exp_sum(v):
        ex = exp_f32(arith.subf(to_compute(v[0], dt), v[1]))
        return [ex, _addf(ex, v[3])]

    ex, s = e.generic([x, m], [_f32_empty(e, t), filled(e, kept, f32, 0.0)],
                      [ident, row, ident, row], iters, exp_sum)
    inv = _row_scalar(e, s, kept, lambda v: arith.divf(arith.constant(f32, 1.0), v))
    par = ["parallel"] * rank
    if dt is DType.float32:  # normalize in place
        return e.generic([inv], [ex], [row, ident], par, lambda v: arith.mulf(v[1], v[0]))
    return e.generic([ex, inv], [e.empty(t)], [ident, row, ident], par,
                     lambda v: to_storage(arith.mulf(v[0], v[1]), dt))


def _sum_of(e: Emitter, x, t: TensorType, fn) -> ir.Value:
    """Per-row f32 sum over the last axis of fn(compute value)."""
    ax = t.rank - 1
    (s,) = reduce_axis(e, [(x, t)], ax, [(ir.F32Type.get(), 0.0)],
                       lambda xs, a: [_addf(fn(to_compute(xs[0], t.dtype), xs[1:]), a[0])])
    return s


@register_lowering("rms_norm", "cpu")
def _rms_norm(e: Emitter, args):
    x, w = args
    t, wt = e.in_types
    ax = t.rank - 1
    kept = reduced(t, ax)
    eps = float(e.attrs["epsilon"])
    off = float(e.attrs.get("weight_offset") or 0.0)
    f32 = ir.F32Type.get()
    n = _count(e, t.shape[ax])
    ss = _sum_of(e, x, t, lambda v, _: arith.mulf(v, v))
    scale = _row_scalar(e, ss, kept, lambda v: arith.divf(
        arith.constant(f32, 1.0),
        math.sqrt(arith.addf(arith.divf(v, n), arith.constant(f32, eps)))))

    def out(v):
        wv = to_compute(v[2], wt.dtype)
        if off:
            wv = arith.addf(wv, arith.constant(f32, off))
        return arith.mulf(arith.mulf(to_compute(v[0], t.dtype), v[1]), wv)

    return [_map_rows(e, [(x, "full"), (scale, "row"), (w, "vec")], t, ax, out)]


@register_lowering("layer_norm", "cpu")
def _layer_norm(e: Emitter, args):
    x, g, b = args
    t, gt, bt = e.in_types
    ax = t.rank - 1
    kept = reduced(t, ax)
    eps = float(e.attrs["epsilon"])
    f32 = ir.F32Type.get()
    n = _count(e, t.shape[ax])
    s = _sum_of(e, x, t, lambda v, _: v)
    mu = _row_scalar(e, s, kept, lambda v: arith.divf(v, n))
    (ss,) = reduce_axis(e, [(x, t), (mu, kept)], ax, [(f32, 0.0)],
                        lambda xs, a: [_addf(_sq(arith.subf(to_compute(xs[0], t.dtype), xs[1])),
                                             a[0])])
    rstd = _row_scalar(e, ss, kept, lambda v: arith.divf(
        arith.constant(f32, 1.0),
        math.sqrt(arith.addf(arith.divf(v, n), arith.constant(f32, eps)))))

    def out(v):
        xv = arith.subf(to_compute(v[0], t.dtype), v[1])
        return arith.addf(arith.mulf(arith.mulf(xv, v[2]), to_compute(v[3], gt.dtype)),
                          to_compute(v[4], bt.dtype))

    return [_map_rows(e, [(x, "full"), (mu, "row"), (rstd, "row"), (g, "vec"), (b, "vec")],
                      t, ax, out)]


def _sq(v):
    return arith.mulf(v, v)
