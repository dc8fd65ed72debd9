"""CPU lowerings of the multi-head latent attention ops (references in ops/mla_math.py).

mla_decode runs the absorbed form and mla_prefill the decompressed one, both as vectorized
MLIR-text kernels (mla_kernels.py: queries along the vector lanes, as flash_attention.py);
mla_attention (graph_mode "auto") is one kernel holding both behind an scf.if on the batch's
most new tokens per sequence, so a call runs only one of them.
mla_cache_store (one RMS norm and a RoPE per token) and mla_prefill_plan are scf.for loops.
"""
from __future__ import annotations

from mlir import ir
from mlir.dialects import arith, math, memref, scf, tensor

from ...registry import register_lowering
from ..emit import Emitter, index, tensor_type
from .elementwise import to_compute, to_storage
from .linalg import inline_mlir
from .mla_kernels import mla_attention_text, mla_decode_text, mla_prefill_text


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


def _clamp(i: ir.Value, n: ir.Value) -> ir.Value:
    """i clamped into [0, n) (unsigned: a negative difference clamps high)."""
    return arith.minui(i, arith.subi(n, index(1)))


def _dim(v: ir.Value, i: int) -> ir.Value:
    if isinstance(v.type, ir.MemRefType):
        return memref.dim(v, index(i))
    return tensor.dim(v, index(i))


class _Ragged:
    """Where packed row t lives: its sequence, absolute position, cache page and slot. Each is
    clamped into the table it indexes, so bad metadata (rows past the last offset, positions
    past the tables, page ids past the pool) stays inside the buffers; valid metadata is
    unchanged."""

    def __init__(self, offs, clen, lut, blocks, freqs):
        self.offs, self.clen, self.lut = offs, clen, lut
        self.batch = _dim(clen, 0)
        self.page_size = ir.MemRefType(blocks.type).shape[3]
        self.lut_cols, self.pages, self.rope_rows = _dim(lut, 1), _dim(blocks, 0), _dim(freqs, 0)

    def seq_of(self, t) -> ir.Value:
        def step(b, n):
            end = _uidx(self.offs, [arith.addi(b, index(1))])
            past = arith.cmpi(arith.CmpIPredicate.ule, end, t)
            return [arith.select(past, arith.addi(n, index(1)), n)]
        return _clamp(_for(0, self.batch, [index(0)], step)[0], self.batch)

    def position(self, b, t) -> ir.Value:
        pos = arith.subi(arith.addi(_uidx(self.clen, [b]), t), _uidx(self.offs, [b]))
        return _clamp(pos, self.rope_rows)

    def page_slot(self, b, pos):
        p = index(self.page_size)
        page = _uidx(self.lut, [b, _clamp(arith.divui(pos, p), self.lut_cols)])
        return _clamp(page, self.pages), arith.remui(pos, p)


@register_lowering("mla_cache_store", "cpu")
def _mla_cache_store(e: Emitter, args):
    kv, w, freqs, offs, clen, lut, blocks = args
    a = e.attrs
    r, rope, layer = a["kv_lora_rank"], a["qk_rope_head_dim"], index(a["layer"])
    kv_dt, w_dt, f_dt, b_dt = (e.in_types[i].dtype for i in (0, 1, 2, 6))
    rag = _Ragged(offs, clen, lut, blocks, freqs)
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


def _attrs(e: Emitter) -> dict:
    a = e.attrs
    return dict(nh=a["n_heads"], nope=a["qk_nope_head_dim"], rope=a["qk_rope_head_dim"],
                v=a["v_head_dim"], r=a["kv_lora_rank"], layer=a["layer"], scale=float(a["scale"]),
                lanes=e.cpu.f32_lanes, regs=e.cpu.vector_registers)


@register_lowering("mla_decode", "cpu")
def _mla_decode(e: Emitter, args):
    return inline_mlir(args, mla_decode_text(args, tensor_type(e.out_types[0]), **_attrs(e)))


@register_lowering("mla_prefill", "cpu")
def _mla_prefill(e: Emitter, args):
    return inline_mlir(args, mla_prefill_text(args, tensor_type(e.out_types[0]),
                                              buffer_size=int(e.attrs["buffer_size"]), **_attrs(e)))


@register_lowering("mla_attention", "cpu")
def _mla_attention(e: Emitter, args):
    return inline_mlir(args, mla_attention_text(args, tensor_type(e.out_types[0]),
                                                buffer_size=int(e.attrs["buffer_size"]),
                                                absorb_max=int(e.attrs["absorb_max"]),
                                                **_attrs(e)))


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
