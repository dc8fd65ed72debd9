"""CPU lowerings of the multi-head latent attention ops (references in ops/mla_math.py).

Both attention ops run the absorbed form: q_nope is taken into latent space through the per-head
up-projection (w_uk, or w_k [NH*nope, R], the same numbers in another layout), scores are
q_lat . [c_kv | k_pe] over the latent cache rows, values the first R columns, then @ w_uv.
For prefill that equals decompressing K and V (q_nope . (W_k c) = (W_k^T q_nope) . c, and
sum_l p_l (c_l W_uv) = (sum_l p_l c_l) W_uv), so its buffer_size only changes rounding. The
ragged loops (a query row sees its own sequence's cache up to its position) are scf.for nests
with an online softmax accumulating straight into the output rows.
"""
from __future__ import annotations

from mlir import ir
from mlir.dialects import arith, linalg, math, memref, scf, tensor

from ...registry import register_lowering
from ..emit import Emitter, element_type, index
from .elementwise import to_compute, to_storage


def _f32(v: float) -> ir.Value:
    return arith.constant(ir.F32Type.get(), v)


def _for(lb, ub, inits, body) -> list:
    """scf.for lb..ub (index values or ints); body(iv, *iter_args) -> yielded values."""
    lb = index(lb) if isinstance(lb, int) else lb
    ub = index(ub) if isinstance(ub, int) else ub
    loop = scf.ForOp(lb, ub, index(1), list(inits))
    with ir.InsertionPoint(loop.body):
        out = body(loop.induction_variable, *loop.inner_iter_args)
        scf.YieldOp(list(out) if out is not None else [])
    return list(loop.results)


def _uidx(t: ir.Value, at: list) -> ir.Value:
    """An unsigned integer tensor element as an index."""
    return arith.index_castui(ir.IndexType.get(), tensor.extract(t, at))


def _dim(v: ir.Value, i: int) -> ir.Value:
    if isinstance(v.type, ir.MemRefType):
        return memref.dim(v, index(i))
    return tensor.dim(v, index(i))


class _Ragged:
    """Where packed row t lives: its sequence, absolute position, cache page and slot."""

    def __init__(self, offs, clen, lut, blocks):
        self.offs, self.clen, self.lut = offs, clen, lut
        self.batch = _dim(clen, 0)
        self.page_size = ir.MemRefType(blocks.type).shape[3]

    def seq_of(self, t) -> ir.Value:
        def step(b, n):
            end = _uidx(self.offs, [arith.addi(b, index(1))])
            past = arith.cmpi(arith.CmpIPredicate.ule, end, t)
            return [arith.select(past, arith.addi(n, index(1)), n)]
        return _for(0, self.batch, [index(0)], step)[0]

    def position(self, b, t) -> ir.Value:
        return arith.subi(arith.addi(_uidx(self.clen, [b]), t), _uidx(self.offs, [b]))

    def page_slot(self, b, pos):
        p = index(self.page_size)
        return _uidx(self.lut, [b, arith.divui(pos, p)]), arith.remui(pos, p)


@register_lowering("mla_cache_store", "cpu")
def _mla_cache_store(e: Emitter, args):
    kv, w, freqs, offs, clen, lut, blocks = args
    a = e.attrs
    r, rope, layer = a["kv_lora_rank"], a["qk_rope_head_dim"], index(a["layer"])
    kv_dt, w_dt, f_dt, b_dt = (e.in_types[i].dtype for i in (0, 1, 2, 6))
    rag = _Ragged(offs, clen, lut, blocks)
    eps, zero = _f32(float(a["eps"])), index(0)

    def row(t):
        b = rag.seq_of(t)
        pos = rag.position(b, t)
        page, slot = rag.page_slot(b, pos)
        at = lambda col: [page, zero, layer, slot, zero, col]  # noqa: E731
        x = lambda col: to_compute(tensor.extract(kv, [t, col]), kv_dt)  # noqa: E731

        def sq(c, acc):
            v = x(c)
            return [arith.addf(acc, arith.mulf(v, v))]
        ss = _for(0, r, [_f32(0.0)], sq)[0]
        inv = math.rsqrt(arith.addf(arith.divf(ss, _f32(float(r))), eps))

        def norm(c):
            wc = to_compute(tensor.extract(w, [c]), w_dt)
            memref.store(to_storage(arith.mulf(arith.mulf(x(c), inv), wc), b_dt), blocks, at(c))
        _for(0, r, [], norm)

        def rot(i):
            two_i = arith.muli(i, index(2))
            if a["interleaved"]:
                ia, ib = two_i, arith.addi(two_i, index(1))
            else:
                ia, ib = i, arith.addi(i, index(rope // 2))
            cos = to_compute(tensor.extract(freqs, [pos, two_i]), f_dt)
            sin = to_compute(tensor.extract(freqs, [pos, arith.addi(two_i, index(1))]), f_dt)
            xa, xb = x(arith.addi(ia, index(r))), x(arith.addi(ib, index(r)))
            ra = arith.subf(arith.mulf(xa, cos), arith.mulf(xb, sin))
            rb = arith.addf(arith.mulf(xa, sin), arith.mulf(xb, cos))
            memref.store(to_storage(ra, b_dt), blocks, at(arith.addi(ia, index(r))))
            memref.store(to_storage(rb, b_dt), blocks, at(arith.addi(ib, index(r))))
        _for(0, rope // 2, [], rot)
    _for(0, _dim(kv, 0), [], lambda t: row(t))
    return []


def _q_latent(e: Emitter, q, w1, nh, nope, rope, r) -> ir.Value:
    """[T, NH, R + rope] f32: q_nope @ w_uk per head, then q_rope."""
    q_dt, w_dt = e.in_types[0].dtype, e.in_types[5].dtype
    t = _dim(q, 0)
    f32 = ir.F32Type.get()
    if ir.RankedTensorType(w1.type).rank == 2:  # prefill's w_k [NH*nope, R]
        w1 = tensor.expand_shape(ir.RankedTensorType.get([nh, nope, r],
                                                         ir.RankedTensorType(w1.type).element_type),
                                 w1, [[0, 1], [2]], [], [nh, nope, r])
    qk = nope + rope
    zero = arith.constant(f32, 0.0)
    acc = linalg.fill(zero, outs=[tensor.EmptyOp([t, nh, r], f32).result])
    d = [ir.AffineDimExpr.get(i) for i in range(4)]  # (t, h, r, d)
    q3 = tensor.expand_shape(ir.RankedTensorType.get([ir.ShapedType.get_dynamic_size(), nh, qk],
                                                     ir.RankedTensorType(q.type).element_type),
                             q, [[0], [1, 2]], [t], [ir.ShapedType.get_dynamic_size(), nh, qk])
    qn = tensor.extract_slice(ir.RankedTensorType.get([ir.ShapedType.get_dynamic_size(), nh, nope],
                                                      ir.RankedTensorType(q.type).element_type),
                              q3, [], [t], [], [0, 0, 0],
                              [ir.ShapedType.get_dynamic_size(), nh, nope], [1, 1, 1])
    maps = [ir.AffineMap.get(4, 0, [d[0], d[1], d[3]]), ir.AffineMap.get(4, 0, [d[1], d[3], d[2]]),
            ir.AffineMap.get(4, 0, [d[0], d[1], d[2]])]
    lat = e.generic([qn, w1], [acc], maps, ["parallel", "parallel", "parallel", "reduction"],
                    lambda v: arith.addf(v[2], arith.mulf(to_compute(v[0], q_dt),
                                                          to_compute(v[1], w_dt))))[0]
    init = tensor.EmptyOp([t, nh, r + rope], f32).result

    def body(_):
        ti, h, c = (linalg.IndexOp(i).result for i in range(3))
        is_lat = arith.cmpi(arith.CmpIPredicate.ult, c, index(r))
        lat_c = arith.select(is_lat, c, index(0))
        rope_c = arith.select(is_lat, index(nope), arith.addi(c, index(nope - r)))
        from_lat = tensor.extract(lat, [ti, h, lat_c])
        from_q = to_compute(tensor.extract(q3, [ti, h, rope_c]), q_dt)
        return arith.select(is_lat, from_lat, from_q)
    return e.generic([], [init], [e.identity_map(3)], ["parallel"] * 3, body)[0]


def _latent_attention(e: Emitter, q_lat, blocks, offs, clen, lut, nh, r, width) -> ir.Value:
    """o_lat [T, NH, R] f32: causal softmax(q_lat . rows * scale) @ rows[:, :R] per head."""
    b_dt = e.in_types[1].dtype
    layer, zero = index(e.attrs["layer"]), index(0)
    scale = _f32(float(e.attrs["scale"]))
    rag = _Ragged(offs, clen, lut, blocks)
    t_n = _dim(q_lat, 0)
    out0 = tensor.EmptyOp([t_n, nh, r], ir.F32Type.get()).result

    def token(t, out):
        b = rag.seq_of(t)
        n_keys = arith.addi(rag.position(b, t), index(1))

        def head(h, out):
            out = _for(0, r, [out], lambda c, o: [tensor.insert(_f32(0.0), o, [t, h, c])])[0]

            def key(l, m, den, out):
                page, slot = rag.page_slot(b, l)
                cache = lambda c: to_compute(memref.load(blocks, [page, zero, layer, slot, zero, c]),  # noqa: E731
                                             b_dt)
                s = _for(0, width, [_f32(0.0)], lambda c, acc: [arith.addf(
                    acc, arith.mulf(tensor.extract(q_lat, [t, h, c]), cache(c)))])[0]
                s = arith.mulf(s, scale)
                m_new = arith.maximumf(m, s)
                corr = math.exp(arith.subf(m, m_new))
                p = math.exp(arith.subf(s, m_new))

                def upd(c, o):
                    old = tensor.extract(o, [t, h, c])
                    new = arith.addf(arith.mulf(old, corr), arith.mulf(p, cache(c)))
                    return [tensor.insert(new, o, [t, h, c])]
                out = _for(0, r, [out], upd)[0]
                return [m_new, arith.addf(arith.mulf(den, corr), p), out]
            m, den, out = _for(0, n_keys, [_f32(float("-inf")), _f32(0.0), out], key)
            inv = arith.divf(_f32(1.0), den)
            return [_for(0, r, [out], lambda c, o: [tensor.insert(
                arith.mulf(tensor.extract(o, [t, h, c]), inv), o, [t, h, c])])[0]]
        return _for(0, nh, [out], head)
    return _for(0, t_n, [out0], token)[0]


def _lower_attention(e: Emitter, args):
    q, blocks, offs, clen, lut, w1, w_uv = args
    a = e.attrs
    nh, nope, rope, v, r = (a[k] for k in ("n_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                          "v_head_dim", "kv_lora_rank"))
    q_lat = _q_latent(e, q, w1, nh, nope, rope, r)
    o_lat = _latent_attention(e, q_lat, blocks, offs, clen, lut, nh, r, r + rope)
    f32 = ir.F32Type.get()
    t = _dim(q, 0)
    dyn = ir.ShapedType.get_dynamic_size()
    acc = linalg.fill(_f32(0.0), outs=[tensor.EmptyOp([t, nh, v], f32).result])
    d = [ir.AffineDimExpr.get(i) for i in range(4)]  # (t, h, j, r)
    maps = [ir.AffineMap.get(4, 0, [d[0], d[1], d[3]]), ir.AffineMap.get(4, 0, [d[1], d[3], d[2]]),
            ir.AffineMap.get(4, 0, [d[0], d[1], d[2]])]
    wv_dt, out_dt = e.in_types[6].dtype, e.out_types[0].dtype
    o = e.generic([o_lat, w_uv], [acc], maps, ["parallel", "parallel", "parallel", "reduction"],
                  lambda x: arith.addf(x[2], arith.mulf(x[0], to_compute(x[1], wv_dt))))[0]
    el = element_type(out_dt, True)
    stored = e.generic([o], [tensor.EmptyOp([t, nh, v], el).result], [e.identity_map(3)] * 2,
                       ["parallel"] * 3, lambda x: to_storage(x[0], out_dt))[0]
    return [tensor.collapse_shape(ir.RankedTensorType.get([dyn, nh * v], el), stored,
                                  [[0], [1, 2]])]


register_lowering("mla_prefill", "cpu")(_lower_attention)
register_lowering("mla_decode", "cpu")(_lower_attention)


@register_lowering("mla_prefill_plan", "cpu")
def _mla_prefill_plan(e: Emitter, args):
    offs, clen = args
    u32 = ir.IntegerType.get_signless(32)
    rows0, starts0 = e.empty(e.out_types[0]), e.empty(e.out_types[1])
    batch = _dim(clen, 0)

    def seq(b, rows, starts, acc):
        cl = tensor.extract(clen, [b])
        n = arith.subi(tensor.extract(offs, [arith.addi(b, index(1))]), tensor.extract(offs, [b]))
        return [tensor.insert(acc, rows, [b]), tensor.insert(cl, starts, [b]),
                arith.addi(acc, arith.addi(n, cl))]
    rows, starts, total = _for(0, batch, [rows0, starts0, arith.constant(u32, 0)], seq)
    rows = tensor.insert(total, rows, [batch])
    tot = tensor.insert(total, e.empty(e.out_types[2]), [index(0)])
    return [rows, starts, tot]
