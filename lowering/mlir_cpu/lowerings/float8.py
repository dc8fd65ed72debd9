"""float8_e4m3fn <-> f32 as integer ops: LLVM has no f8 type, so arith.extf / arith.truncf on
f8E4M3FN cannot be lowered; `legalize_float8` rewrites them after a kernel is emitted.

Conversion rules (those of graphir.dtype.round_to_f8e4m3fn): round to nearest even, saturate to
+-448 (the "fn" variant has no infinity), NaN stays NaN (0x7F), the sign of zero is kept.
The float8 Linear (nn/linear.py) touches f8 only through `cast` (f8 weight -> activations'
dtype, and the quantize-dequantize of the input through f8), so the cast lowering is wrapped
here; any other op reading or writing f8 gets legalized by the same walker.
"""
from __future__ import annotations

from mlir import ir
from mlir.dialects import arith, math

from ...registry import LOWERINGS

_F8_MAX_CODE = 0x7E        # 448 = 1.75 * 2^8
_F8_NAN = 0x7F
_MIN_NORMAL_BITS = 0x3C800000  # 2^-6 as f32 bits, the smallest normal f8
_EXP_REBIAS = (127 - 7) << 3   # f32 exponent bias minus f8's, at the f8 exponent's position


def _i32(v: int) -> ir.Value:
    return arith.constant(ir.IntegerType.get_signless(32), v)


def _f32(v: float) -> ir.Value:
    return arith.constant(ir.F32Type.get(), v)


def _is_f8(t: ir.Type) -> bool:
    return isinstance(t, ir.Float8E4M3FNType)


def f32_to_f8_bits(x: ir.Value) -> ir.Value:
    """f32 scalar -> its float8_e4m3fn code as i8 (RNE, saturating)."""
    i32, i8 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(8)
    bits = arith.bitcast(i32, x)
    sign = arith.andi(arith.shrui(bits, _i32(24)), _i32(0x80))
    mag = arith.andi(bits, _i32(0x7FFFFFFF))
    # Normal range: keep 3 of the 23 mantissa bits, rounding to nearest even on the bit pattern
    # (a carry into the exponent is the correct next binade).
    lsb = arith.andi(arith.shrui(mag, _i32(20)), _i32(1))
    rounded = arith.shrui(arith.addi(arith.addi(mag, _i32(0x7FFFF)), lsb), _i32(20))
    normal = arith.minsi(arith.subi(rounded, _i32(_EXP_REBIAS)), _i32(_F8_MAX_CODE))
    # Subnormals are multiples of 2^-9: scaling by 2^9 is exact, roundeven picks the code
    # (8 becomes the smallest normal, 0x08, as it should).
    absx = arith.bitcast(ir.F32Type.get(), mag)
    sub = arith.fptoui(i32, math.roundeven(arith.mulf(absx, _f32(512.0))))
    is_normal = arith.cmpi(arith.CmpIPredicate.uge, mag, _i32(_MIN_NORMAL_BITS))
    code = arith.select(is_normal, normal, sub)
    is_nan = arith.cmpi(arith.CmpIPredicate.ugt, mag, _i32(0x7F800000))
    code = arith.select(is_nan, _i32(_F8_NAN), code)
    return arith.trunci(i8, arith.ori(code, sign))


def f8_bits_to_f32(c: ir.Value) -> ir.Value:
    """float8_e4m3fn code (i8) -> f32 (exact)."""
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    v = arith.extui(i32, c)
    sign = arith.shli(arith.andi(v, _i32(0x80)), _i32(24))
    exp = arith.andi(arith.shrui(v, _i32(3)), _i32(0xF))
    man = arith.andi(v, _i32(7))
    normal = arith.ori(arith.shli(arith.addi(exp, _i32(120)), _i32(23)),
                       arith.shli(man, _i32(20)))
    sub = arith.bitcast(i32, arith.mulf(arith.uitofp(f32, man), _f32(2.0 ** -9)))
    mag = arith.select(arith.cmpi(arith.CmpIPredicate.eq, exp, _i32(0)), sub, normal)
    is_nan = arith.cmpi(arith.CmpIPredicate.eq, arith.andi(v, _i32(0x7F)), _i32(_F8_NAN))
    mag = arith.select(is_nan, _i32(0x7FC00000), mag)
    return arith.bitcast(f32, arith.ori(mag, sign))


def _replace(op, build) -> None:
    with ir.InsertionPoint(op), op.location:
        new = build()
    op.result.replace_all_uses_with(new)
    op.erase()


def legalize_float8(root) -> int:
    """Rewrite every scalar arith.extf from / arith.truncf to f8E4M3FN under `root` (an op) into
    integer ops; returns how many were rewritten."""
    found = []

    def visit(op):
        name = op.name
        if name == "arith.extf" and _is_f8(op.operands[0].type):
            found.append(("ext", op))
        elif name == "arith.truncf" and _is_f8(op.result.type):
            found.append(("trunc", op))
        return ir.WalkResult.ADVANCE

    root.walk(visit)
    i8, f8 = ir.IntegerType.get_signless(8), ir.Float8E4M3FNType.get()
    for kind, op in found:
        src, dst = op.operands[0], op.result.type
        if kind == "ext":
            def build(src=src, dst=dst):
                y = f8_bits_to_f32(arith.bitcast(i8, src))
                return y if isinstance(dst, ir.F32Type) else arith.truncf(dst, y)
        else:
            def build(src=src):
                x = src if isinstance(src.type, ir.F32Type) else arith.extf(ir.F32Type.get(), src)
                return arith.bitcast(f8, f32_to_f8_bits(x))
        _replace(op, build)
    return len(found)
