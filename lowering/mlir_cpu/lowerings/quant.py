"""CPU lowerings of the quantized-weight ops: `dequantize` (GGUF) and `qmatmul` (GGUF, GPTQ).

Decoding follows the bit layouts of ops/quant/gguf_blocks.py and ops/quant/gptq_layout.py with
the same float32 operations in the same order, so a decoded weight is bit-identical to the
interpreter's. qmatmul decodes straight into the panel-packed layout `[N/NR, K, NR]` (one panel per parallel
iteration) that the packed-matmul schedule (schedules.py) multiplies with; when N is not a
multiple of NR it decodes `[N, K]` and runs a plain contraction. Products accumulate in f32.
The decoded weight is materialized per call (a K-blocked decode fused into the matmul loop would
avoid that).
"""
from __future__ import annotations

from mlir import ir
from mlir.dialects import arith, linalg, scf, tensor

from graphir.dtype import DType
from graphir.ops.quant.gguf_blocks import gguf_block_geometry
from graphir.ops.quant.gptq import resolve_group_size

from ...registry import register_lowering
from ..emit import DYN, Emitter, element_type, index
from ..schedules import emit_packed_matmul
from .elementwise import to_compute, to_storage

NR = 16  # panel width of the packed-matmul schedule (MatmulConfig.nr)


def _i32(v: int) -> ir.Value:
    return arith.constant(ir.IntegerType.get_signless(32), v)


def _idx(i: int) -> ir.Value:
    return linalg.IndexOp(i).result


def _byte(w: ir.Value, row: ir.Value, col: ir.Value) -> ir.Value:
    """w[row, col] (uint8 storage) zero-extended to i32."""
    return arith.extui(ir.IntegerType.get_signless(32), tensor.extract(w, [row, col]))


def _sbyte(w, row, col) -> ir.Value:
    return arith.extsi(ir.IntegerType.get_signless(32), tensor.extract(w, [row, col]))


def _f16_at(w, row, col) -> ir.Value:
    """The little-endian float16 at bytes col, col+1 of row, as f32."""
    lo, hi = _byte(w, row, col), _byte(w, row, arith.addi(col, index(1)))
    bits = arith.trunci(ir.IntegerType.get_signless(16), arith.ori(lo, arith.shli(hi, _i32(8))))
    return arith.extf(ir.F32Type.get(), arith.bitcast(ir.F16Type.get(), bits))


def _itof(x: ir.Value) -> ir.Value:
    return arith.sitofp(ir.F32Type.get(), x)


def _split(j: ir.Value, elems: int, nbytes: int):
    """(byte offset of j's block, j's position in its block)."""
    return arith.muli(arith.divui(j, index(elems)), index(nbytes)), arith.remui(j, index(elems))


def _q4_0(w, row, j):
    base, i = _split(j, 32, 18)
    d = _f16_at(w, row, base)
    byte = _byte(w, row, arith.addi(base, arith.addi(index(2), arith.remui(i, index(16)))))
    hi = arith.cmpi(arith.CmpIPredicate.uge, i, index(16))
    q = arith.select(hi, arith.shrui(byte, _i32(4)), arith.andi(byte, _i32(15)))
    return arith.mulf(d, _itof(arith.subi(q, _i32(8))))


def _q8_0(w, row, j):
    base, i = _split(j, 32, 34)
    d = _f16_at(w, row, base)
    q = _sbyte(w, row, arith.addi(base, arith.addi(index(2), i)))
    return arith.mulf(_itof(q), d)


def _q4_k(w, row, j):
    base, i = _split(j, 256, 144)
    d, dmin = _f16_at(w, row, base), _f16_at(w, row, arith.addi(base, index(2)))
    s, l = arith.divui(i, index(32)), arith.remui(i, index(32))
    t = arith.remui(s, index(4))
    a = _byte(w, row, arith.addi(base, arith.addi(index(4), t)))
    b = _byte(w, row, arith.addi(base, arith.addi(index(8), t)))
    c = _byte(w, row, arith.addi(base, arith.addi(index(12), t)))
    # Sub-blocks 0-3: low 6 bits of a (scale) / b (min); 4-7: a nibble of c plus the top two
    # bits of a / b.
    six = _i32(6)
    sc_hi = arith.ori(arith.andi(c, _i32(15)), arith.shli(arith.shrui(a, six), _i32(4)))
    mn_hi = arith.ori(arith.shrui(c, _i32(4)), arith.shli(arith.shrui(b, six), _i32(4)))
    upper = arith.cmpi(arith.CmpIPredicate.uge, s, index(4))
    sc = arith.select(upper, sc_hi, arith.andi(a, _i32(63)))
    mn = arith.select(upper, mn_hi, arith.andi(b, _i32(63)))
    chunk = arith.muli(arith.divui(s, index(2)), index(32))
    byte = _byte(w, row, arith.addi(base, arith.addi(index(16), arith.addi(chunk, l))))
    odd = arith.cmpi(arith.CmpIPredicate.ne, arith.remui(s, index(2)), index(0))
    q = arith.select(odd, arith.shrui(byte, _i32(4)), arith.andi(byte, _i32(15)))
    return arith.subf(arith.mulf(arith.mulf(d, _itof(sc)), _itof(q)), arith.mulf(dmin, _itof(mn)))


def _q6_k(w, row, j):
    base, i = _split(j, 256, 210)
    h, r = arith.divui(i, index(128)), arith.remui(i, index(128))
    lo_byte = _byte(w, row, arith.addi(base, arith.addi(arith.muli(h, index(64)),
                                                        arith.remui(r, index(64)))))
    upper = arith.cmpi(arith.CmpIPredicate.uge, r, index(64))
    low4 = arith.select(upper, arith.shrui(lo_byte, _i32(4)), arith.andi(lo_byte, _i32(15)))
    k, l = arith.divui(r, index(32)), arith.remui(r, index(32))
    qh = _byte(w, row, arith.addi(base, arith.addi(index(128),
                                                   arith.addi(arith.muli(h, index(32)), l))))
    shift = arith.index_cast(ir.IntegerType.get_signless(32), arith.muli(k, index(2)))
    high2 = arith.andi(arith.shrui(qh, shift), _i32(3))
    q = arith.subi(arith.ori(low4, arith.shli(high2, _i32(4))), _i32(32))
    sc = _sbyte(w, row, arith.addi(base, arith.addi(index(192), arith.divui(i, index(16)))))
    d = _f16_at(w, row, arith.addi(base, index(208)))
    return arith.mulf(arith.mulf(d, _itof(sc)), _itof(q))


def _le_word(w, row, col, n: int) -> ir.Value:
    """n little-endian bytes from col, as an i32."""
    v = _byte(w, row, col)
    for b in range(1, n):
        v = arith.ori(v, arith.shli(_byte(w, row, arith.addi(col, index(b))), _i32(8 * b)))
    return v


def _f32_raw(w, row, j):
    return arith.bitcast(ir.F32Type.get(), _le_word(w, row, arith.muli(j, index(4)), 4))


def _f16_raw(w, row, j):
    return _f16_at(w, row, arith.muli(j, index(2)))


def _bf16_raw(w, row, j):
    bits = arith.shli(_le_word(w, row, arith.muli(j, index(2)), 2), _i32(16))
    return arith.bitcast(ir.F32Type.get(), bits)


_GGUF = {"Q4_0": _q4_0, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k, "F32": _f32_raw,
         "F16": _f16_raw, "BF16": _bf16_raw}


def _gptq_decoder(e: Emitter, args, n_in: int, n_out: int):
    """(w, row n, col k) -> W^T[n, k] in f32 for the GPTQ operands of the node."""
    w = args[1]
    a = e.attrs
    gs = resolve_group_size(a["group_size"], n_in)
    zeros = args[2] if not a["sym"] else None
    plus_one = a["checkpoint_format"] == "gptq"  # v1 stores zero - 1

    def value(_, n, k):
        # Byte of code (k, n): qweight int32 [in/8, out] viewed as bytes, read with out columns.
        flat = arith.addi(arith.muli(arith.addi(arith.muli(arith.divui(k, index(8)), index(n_out)),
                                                n), index(4)),
                          arith.divui(arith.remui(k, index(8)), index(2)))
        byte = _byte(w, arith.divui(flat, index(n_out)), arith.remui(flat, index(n_out)))
        odd = arith.cmpi(arith.CmpIPredicate.ne, arith.remui(k, index(2)), index(0))
        code = arith.select(odd, arith.shrui(byte, _i32(4)), arith.andi(byte, _i32(15)))
        g = arith.divui(k, index(gs))
        sflat = arith.muli(arith.addi(arith.muli(g, index(n_out)), n), index(2))
        srow = arith.addi(index(n_in // 2), arith.divui(sflat, index(n_out)))
        scale = _f16_at(w, srow, arith.remui(sflat, index(n_out)))
        if zeros is None:
            zero = _i32(8)
        else:
            word = tensor.extract(zeros, [g, arith.divui(n, index(8))])
            shift = arith.index_cast(ir.IntegerType.get_signless(32),
                                     arith.muli(arith.remui(n, index(8)), index(4)))
            zero = arith.andi(arith.shrui(word, shift), _i32(15))
            if plus_one:
                zero = arith.addi(zero, _i32(1))
        return arith.mulf(_itof(arith.subi(code, zero)), scale)
    return value


# -- emission ------------------------------------------------------------------------------------
def _decode_generic(e: Emitter, w: ir.Value, shape: list[int], value) -> ir.Value:
    """Decoded weights W^T [N, K] f32 (value(w, n, k) -> f32)."""
    init = tensor.EmptyOp(shape, ir.F32Type.get()).result
    return e.generic([], [init], [e.identity_map(2)], ["parallel"] * 2,
                     lambda _: value(w, _idx(0), _idx(1)))[0]


def _decode_packed(e: Emitter, w: ir.Value, n_out: int, n_in: int, value) -> ir.Value:
    """Decoded weights in the packed panels [N/NR, K, NR], one panel per parallel iteration."""
    f32 = ir.F32Type.get()
    n_panels = n_out // NR
    loop = scf.ForallOp([0], [n_panels], [1], shared_outs=[tensor.EmptyOp([n_panels, n_in, NR],
                                                                          f32).result])
    with ir.InsertionPoint.at_block_begin(loop.body):
        p = loop.induction_variables[0]
        panel = e.generic([], [tensor.EmptyOp([1, n_in, NR], f32).result],
                          [e.identity_map(3)], ["parallel"] * 3,
                          lambda _: value(w, arith.addi(arith.muli(p, index(NR)), _idx(2)),
                                          _idx(1)))[0]
    with ir.InsertionPoint(loop.terminator().region.blocks[0]):
        tensor.parallel_insert_slice(panel, loop.inner_iter_args[0], [p], [], [],
                                     [DYN, 0, 0], [1, n_in, NR], [1, 1, 1])
    return loop.result


def _rows_of(e: Emitter, x: ir.Value, xt) -> tuple[ir.Value, list]:
    """x [..., K] as a 2-D [M, K] tensor, and the sizes of its leading dims."""
    lead = e.sizes(xt)[:-1]
    if xt.rank == 2:
        return x, lead
    k = int(xt.shape[-1])
    el = ir.RankedTensorType(x.type).element_type
    if xt.rank == 1:
        t2 = ir.RankedTensorType.get([1, k], el)
        return tensor.expand_shape(t2, x, [[0, 1]], [], [1, k]), lead
    static = [s if isinstance(s, int) else DYN for s in lead]
    m = 1
    for s in static:
        m = DYN if s == DYN or m == DYN else m * s
    t2 = ir.RankedTensorType.get([m, k], el)
    return tensor.collapse_shape(t2, x, [list(range(xt.rank - 1)), [xt.rank - 1]]), lead


def _activations(e: Emitter, x2: ir.Value, dt: DType, perm: ir.Value | None, perm_dt) -> ir.Value:
    """x as f32 [M, K], its columns gathered by perm (GPTQ desc_act)."""
    xt = ir.RankedTensorType(x2.type)
    f32 = ir.F32Type.get()
    if perm is None and dt is DType.float32:
        return x2
    m = xt.shape[0]
    dyn = [tensor.dim(x2, index(0))] if ir.ShapedType.is_dynamic_size(m) else []
    init = tensor.EmptyOp([dyn[0] if dyn else m, xt.shape[1]], f32).result
    if perm is None:
        maps = [e.identity_map(2)] * 2
        return e.generic([x2], [init], maps, ["parallel"] * 2,
                         lambda v: to_compute(v[0], dt))[0]

    def body(_):
        p = tensor.extract(perm, [_idx(1)])
        cast = arith.index_castui if perm_dt is DType.uint32 else arith.index_cast
        return to_compute(tensor.extract(x2, [_idx(0), cast(ir.IndexType.get(), p)]), dt)
    return e.generic([], [init], [e.identity_map(2)], ["parallel"] * 2, body)[0]


def _plain_matmul(e: Emitter, a: ir.Value, wt: ir.Value) -> ir.Value:
    """a [M, K] @ wt[N, K]^T in f32 (for N that is not a whole number of panels)."""
    at, n = ir.RankedTensorType(a.type), ir.RankedTensorType(wt.type).shape[0]
    f32 = ir.F32Type.get()
    dyn = [tensor.dim(a, index(0))] if ir.ShapedType.is_dynamic_size(at.shape[0]) else []
    init = linalg.fill(arith.constant(f32, 0.0),
                       outs=[tensor.EmptyOp([dyn[0] if dyn else at.shape[0], n], f32).result])
    d = [ir.AffineDimExpr.get(i) for i in range(3)]  # (m, n, k)
    maps = [ir.AffineMap.get(3, 0, [d[0], d[2]]), ir.AffineMap.get(3, 0, [d[1], d[2]]),
            ir.AffineMap.get(3, 0, [d[0], d[1]])]
    return e.generic([a, wt], [init], maps, ["parallel", "parallel", "reduction"],
                     lambda v: arith.addf(v[2], arith.mulf(v[0], v[1])))[0]


def _finish(e: Emitter, y: ir.Value, lead: list, xt) -> ir.Value:
    """f32 [M, N] -> the result: its dtype, x's leading dims."""
    out = e.out_types[0]
    if out.dtype is not DType.float32:
        yt = ir.RankedTensorType(y.type)
        dyn = [tensor.dim(y, index(0))] if ir.ShapedType.is_dynamic_size(yt.shape[0]) else []
        init = tensor.EmptyOp([dyn[0] if dyn else yt.shape[0], yt.shape[1]],
                              element_type(out.dtype, True)).result
        y = e.generic([y], [init], [e.identity_map(2)] * 2, ["parallel"] * 2,
                      lambda v: to_storage(v[0], out.dtype))[0]
    if xt.rank == 2:
        return y
    n = int(out.shape[-1])
    el = ir.RankedTensorType(y.type).element_type
    rt = ir.RankedTensorType.get([s if isinstance(s, int) else DYN for s in lead] + [n], el)
    if xt.rank == 1:
        return tensor.collapse_shape(rt, y, [[0, 1]])
    dyn = [s for s in lead if not isinstance(s, int)]
    static = [s if isinstance(s, int) else DYN for s in lead] + [n]
    return tensor.expand_shape(rt, y, [list(range(xt.rank - 1)), [xt.rank - 1]], dyn, static)


@register_lowering("dequantize", "cpu")
def _dequantize(e: Emitter, args):
    out = e.out_types[0]
    rows, cols = int(out.shape[0]), int(out.shape[1])
    return [_decode_generic(e, args[0], [rows, cols], _GGUF[e.attrs["encoding"]])]


@register_lowering("qmatmul", "cpu")
def _qmatmul(e: Emitter, args):
    enc = e.attrs["encoding"]
    xt = e.in_types[0]
    n_in, n_out = int(xt.shape[-1]), int(e.out_types[0].shape[-1])
    perm = perm_dt = None
    if enc == "GPTQ":
        value = _gptq_decoder(e, args, n_in, n_out)
        if e.attrs["desc_act"]:
            perm, perm_dt = args[-1], e.in_types[-1].dtype
    else:
        gguf_block_geometry(enc)  # validates the name
        value = _GGUF[enc]
    x2, lead = _rows_of(e, args[0], xt)
    a = _activations(e, x2, xt.dtype, perm, perm_dt)
    w = args[1]
    if n_out % NR == 0:
        bp = _decode_packed(e, w, n_out, n_in, value)
        y = emit_packed_matmul(a, bp)
    else:
        y = _plain_matmul(e, a, _decode_generic(e, w, [n_out, n_in], value))
    return [_finish(e, y, lead, xt)]
