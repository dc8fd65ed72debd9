"""CPU lowerings of the elementwise ops: one linalg.generic each, operands broadcast by maps.

Floats narrower than f32 compute in f32 and round once on store (arith.truncf is
round-to-nearest-even), as the interpreter rounds its float64 result once.
"""
from __future__ import annotations

from mlir import ir
from mlir.dialects import arith, math

from graphir.dtype import DType

from ...registry import register_lowering
from ..emit import Emitter, element_type

F32 = DType.float32


def _is_unsigned(dt: DType) -> bool:
    return dt in (DType.uint8, DType.uint32)


def to_compute(x: ir.Value, dt: DType) -> ir.Value:
    """Storage value -> the value ops compute on (f32 for narrow floats, i1 for bool)."""
    if dt in (DType.float16, DType.bfloat16, DType.float8_e4m3fn):
        return arith.extf(ir.F32Type.get(), x)
    if dt is DType.bool:
        return arith.trunci(ir.IntegerType.get_signless(1), x)
    return x


def to_storage(x: ir.Value, dt: DType) -> ir.Value:
    if dt in (DType.float16, DType.bfloat16, DType.float8_e4m3fn):
        return arith.truncf(element_type(dt), x)
    if dt is DType.bool:
        return arith.extui(ir.IntegerType.get_signless(8), x)
    return x


def _fconst(x: ir.Value, v: float) -> ir.Value:
    return arith.constant(x.type, v)


def _sigmoid(x):
    one = _fconst(x, 1.0)
    return arith.divf(one, arith.addf(one, math.exp(arith.negf(x))))


def _gelu(x, approximate):
    half, one = _fconst(x, 0.5), _fconst(x, 1.0)
    if approximate == "tanh":
        c, k = _fconst(x, 0.7978845608028654), _fconst(x, 0.044715)
        inner = arith.mulf(c, arith.addf(x, arith.mulf(k, arith.mulf(x, arith.mulf(x, x)))))
        return arith.mulf(arith.mulf(half, x), arith.addf(one, math.tanh(inner)))
    return arith.mulf(arith.mulf(half, x),
                      arith.addf(one, math.erf(arith.mulf(x, _fconst(x, 0.7071067811865476)))))


_FLOAT_UNARY = {
    "neg": lambda x, a: arith.negf(x), "abs": lambda x, a: math.absf(x),
    "exp": lambda x, a: math.exp(x), "log": lambda x, a: math.log(x),
    "sqrt": lambda x, a: math.sqrt(x), "rsqrt": lambda x, a: math.rsqrt(x),
    "tanh": lambda x, a: math.tanh(x), "sigmoid": lambda x, a: _sigmoid(x),
    "silu": lambda x, a: arith.mulf(x, _sigmoid(x)),
    "gelu": lambda x, a: _gelu(x, a.get("approximate", "none")),
    "cos": lambda x, a: math.cos(x), "sin": lambda x, a: math.sin(x),
    "floor": lambda x, a: math.floor(x),
}
_INT_UNARY = {
    "neg": lambda x, a: arith.subi(arith.constant(x.type, 0), x),
    "abs": lambda x, a: math.absi(x),
    "floor": lambda x, a: x,
}


def _float_mod(a, b):
    # numpy mod takes the divisor's sign: fix C fmod where the signs differ.
    r = arith.remf(a, b)
    zero = _fconst(r, 0.0)
    fix = arith.andi(arith.cmpf(arith.CmpFPredicate.UNE, r, zero),
                     arith.xori(arith.cmpf(arith.CmpFPredicate.OLT, r, zero),
                                arith.cmpf(arith.CmpFPredicate.OLT, b, zero)))
    return arith.select(fix, arith.addf(r, b), r)


def _int_mod(a, b, unsigned):
    if unsigned:
        return arith.remui(a, b)
    r = arith.remsi(a, b)
    zero = arith.constant(r.type, 0)
    fix = arith.andi(arith.cmpi(arith.CmpIPredicate.ne, r, zero),
                     arith.xori(arith.cmpi(arith.CmpIPredicate.slt, r, zero),
                                arith.cmpi(arith.CmpIPredicate.slt, b, zero)))
    return arith.select(fix, arith.addi(r, b), r)


def _binary(op, a, b, dt):
    if dt.is_float:
        return {"add": arith.addf, "sub": arith.subf, "mul": arith.mulf, "div": arith.divf,
                "pow": math.powf, "maximum": arith.maximumf, "minimum": arith.minimumf,
                "mod": _float_mod}[op](a, b)
    u = _is_unsigned(dt)
    return {"add": arith.addi, "sub": arith.subi, "mul": arith.muli,
            "div": arith.divui if u else arith.floordivsi, "pow": math.ipowi,
            "maximum": arith.maxui if u else arith.maxsi,
            "minimum": arith.minui if u else arith.minsi,
            "mod": lambda x, y: _int_mod(x, y, u)}[op](a, b)


_FCMP = {"greater": arith.CmpFPredicate.OGT, "greater_equal": arith.CmpFPredicate.OGE,
         "equal": arith.CmpFPredicate.OEQ, "not_equal": arith.CmpFPredicate.UNE}
_ICMP = {"greater": ("sgt", "ugt"), "greater_equal": ("sge", "uge"), "equal": ("eq", "eq"),
         "not_equal": ("ne", "ne")}


def _compare(op, a, b, dt):
    if dt.is_float:
        return arith.cmpf(_FCMP[op], a, b)
    pred = _ICMP[op][1 if _is_unsigned(dt) or dt is DType.bool else 0]
    return arith.cmpi(getattr(arith.CmpIPredicate, pred), a, b)


def elementwise(e: Emitter, args, fn) -> list:
    """One generic over the result's shape; fn(compute_values) -> compute value."""
    out = e.out_types[0]
    maps = [e.broadcast_map(t, out) for t in e.in_types] + [e.identity_map(out.rank)]

    def body(vals):
        xs = [to_compute(v, t.dtype) for v, t in zip(vals, e.in_types)]
        return to_storage(fn(xs), out.dtype)

    return e.generic(args, [e.empty(out)], maps, ["parallel"] * out.rank, body)


def _register_unary(name):
    @register_lowering(name, "cpu")
    def lower(e: Emitter, args):
        dt = e.in_types[0].dtype
        table = _FLOAT_UNARY if dt.is_float else _INT_UNARY
        if name not in table:
            raise NotImplementedError(f"gir.{name} on {dt.short}")
        return elementwise(e, args, lambda xs: table[name](xs[0], e.attrs))


def _register_binary(name):
    @register_lowering(name, "cpu")
    def lower(e: Emitter, args):
        dt = e.in_types[0].dtype
        return elementwise(e, args, lambda xs: _binary(name, xs[0], xs[1], dt))


def _register_compare(name):
    @register_lowering(name, "cpu")
    def lower(e: Emitter, args):
        dt = e.in_types[0].dtype
        return elementwise(e, args, lambda xs: _compare(name, xs[0], xs[1], dt))


for _n in set(_FLOAT_UNARY) | set(_INT_UNARY):
    _register_unary(_n)
for _n in ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "mod"):
    _register_binary(_n)
for _n in _FCMP:
    _register_compare(_n)


@register_lowering("logical_and", "cpu")
def _land(e, args):
    return elementwise(e, args, lambda xs: arith.andi(xs[0], xs[1]))


@register_lowering("logical_or", "cpu")
def _lor(e, args):
    return elementwise(e, args, lambda xs: arith.ori(xs[0], xs[1]))


@register_lowering("where", "cpu")
def _where(e, args):
    return elementwise(e, args, lambda xs: arith.select(xs[0], xs[1], xs[2]))


@register_lowering("clamp", "cpu")
def _clamp(e, args):
    dt = e.in_types[0].dtype
    lo, hi = e.attrs.get("min"), e.attrs.get("max")

    def fn(xs):
        x = xs[0]
        if dt.is_float:
            if hi is not None:
                x = arith.minimumf(x, _fconst(x, hi))
            if lo is not None:
                x = arith.maximumf(x, _fconst(x, lo))
            return x
        import math as _m

        if hi is not None:
            x = arith.minsi(x, arith.constant(x.type, _m.floor(hi)))
        if lo is not None:
            x = arith.maxsi(x, arith.constant(x.type, _m.ceil(lo)))
        return x
    return elementwise(e, args, fn)


def convert(x: ir.Value, src: DType, dst: DType) -> ir.Value:
    """Compute-domain value of dtype src -> compute-domain value of dtype dst."""
    if src is dst:
        return x
    f32 = ir.F32Type.get()
    if dst is DType.bool:
        if src.is_float:
            return arith.cmpf(arith.CmpFPredicate.UNE, x, arith.constant(x.type, 0.0))
        return arith.cmpi(arith.CmpIPredicate.ne, x, arith.constant(x.type, 0))
    if dst.is_float:
        target = f32  # every float computes in f32; to_storage rounds to dst
        if src.is_float:
            return x  # compute domain is f32 for every float; to_storage rounds
        if src is DType.bool or _is_unsigned(src):
            return arith.uitofp(target, x)
        return arith.sitofp(target, x)
    it = element_type(dst, True)
    if src.is_float:
        return arith.fptoui(it, x) if _is_unsigned(dst) else arith.fptosi(it, x)
    sw, dw = ir.IntegerType(x.type).width, ir.IntegerType(it).width
    if dw == sw:
        return x
    if dw < sw:
        return arith.trunci(it, x)
    return arith.extui(it, x) if src is DType.bool or _is_unsigned(src) else arith.extsi(it, x)


@register_lowering("cast", "cpu")
def _cast(e, args):
    src, dst = e.in_types[0].dtype, e.out_types[0].dtype
    return elementwise(e, args, lambda xs: convert(xs[0], src, dst))
