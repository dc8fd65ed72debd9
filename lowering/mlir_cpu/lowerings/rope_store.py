"""CPU lowerings of rope, kv_cache_store and rope_split_store (MLIR text over memrefs).

One scf.forall over the packed rows; a row finds its sequence by counting offsets (O(batch)),
hence its absolute position (cache length + index in the sequence), RoPE row and cache slot
(page from the lookup table). Heads go through a small f32 scratch row: optional per-head
RMSNorm (rounded to the op's dtype, as the reference does), then RoPE with the cos/sin pairs
deinterleaved from the table row, in vectors of up to 8 lanes.
"""
from __future__ import annotations

from mlir import ir

from ...registry import register_lowering
from ..emit import Emitter, tensor_type
from .attention import Text, alloc_like, cache_dims, finish, fvec, load_f32, memref_of, sequence_of_row, \
    store_from_f32, to_buffer
from .linalg import inline_mlir


def _lanes(n: int) -> int:
    return next(w for w in (8, 4, 2, 1) if n % w == 0)


def _el(v) -> str:
    return str(ir.ShapedType(v.type).element_type)


class _Row:
    """Per-row context: position, sequence, cache page/slot, scratch row."""

    def __init__(self, t: Text, offm, offt, clm, clt, batch, freqs=None, lut=None, blocks=None):
        self.seq = sequence_of_row(t, "%row", offm, offt, batch)
        start = t.load_index(offm, [self.seq], offt)
        cl = t.load_index(clm, [self.seq], clt)
        self.pos = t(f"arith.addi {cl}, {t(f'arith.subi %row, {start} : index')} : index")
        # RoPE row, page-table column and page id clamped into their tables: bad metadata
        # (positions past the tables, page ids past the pool) stays in bounds.
        if freqs is not None:
            self.pos = t.clamp(self.pos, t.dim(freqs[0], 0, freqs[1]))
        if lut is not None:
            (lutm, lutt), (bm, bt, page_size) = lut, blocks
            col = t.clamp(t(f"arith.divui {self.pos}, {t.idx(page_size)} : index"),
                          t.dim(lutm, 1, lutt))
            self.page = t.clamp(t.load_index(lutm, [self.seq, col], lutt), t.dim(bm, 0, bt))
            self.slot = t(f"arith.remui {self.pos}, {t.idx(page_size)} : index")


def _load_head(t: Text, hs: str, d: int, src: str, src_t: str, el: str, col0: str,
               norm: tuple[str, str, str, float] | None = None) -> None:
    """scratch hs[0:d] = src[%row, col0:col0+d] as f32, RMS-normed (x * rsqrt(mean x^2 + eps) * w)."""
    w = _lanes(d)
    v, hst = fvec(w), f"memref<{d}xf32>"
    xs = [load_f32(t, src, ["%row", t(f"arith.addi {col0}, {t.idx(k)} : index")], src_t, el, w)
          for k in range(0, d, w)]
    if norm is not None:
        wm, wt, wel, eps = norm
        acc = t.const("0.0", v)
        for x in xs:
            acc = t(f"math.fma {x}, {x}, {acc} : {v}")
        ss = t(f"vector.reduction <add>, {acc} : {v} into f32")
        ms = t(f"math.fma {ss}, {t.const(f'{1.0 / d:.17e}', 'f32')}, {t.const(f'{eps:.17e}', 'f32')} : f32")
        rv = t(f"vector.broadcast {t(f'math.rsqrt {ms} : f32')} : f32 to {v}")
        normed = []
        for i, x in enumerate(xs):
            wv = load_f32(t, wm, [t.idx(i * w)], wt, wel, w)
            y = t(f"arith.mulf {t(f'arith.mulf {x}, {rv} : {v}')}, {wv} : {v}")
            if el != "f32":  # the reference rounds the normed head to the op's dtype
                y = t(f"arith.extf {t(f'arith.truncf {y} : {v} to vector<{w}x{el}>')} : vector<{w}x{el}> to {v}")
            normed.append(y)
        xs = normed
    for k, x in zip(range(0, d, w), xs):
        t.stmt(f"vector.store {x}, {hs}[{t.idx(k)}] : {hst}, {v}")


def _rope_head(t: Text, hs: str, d: int, freqs: tuple[str, str, str], pos: str,
               interleaved: bool, store) -> None:
    """Rotate scratch hs by table row `pos`; store(offset, f32 vector, lanes) writes results."""
    fm, ft, fel = freqs
    half = d // 2
    w = _lanes(half)
    v, v2, hst = fvec(w), fvec(2 * w), f"memref<{d}xf32>"
    for k in range(0, half, w):
        f = load_f32(t, fm, [pos, t.idx(2 * k)], ft, fel, 2 * w)
        cs = t(f"vector.deinterleave {f} : {v2} -> {v}", n=2)
        cos, sin = f"{cs}#0", f"{cs}#1"
        if interleaved:
            ab = t(f"vector.deinterleave {t(f'vector.load {hs}[{t.idx(2 * k)}] : {hst}, {v2}')} : {v2} -> {v}", n=2)
            a, b = f"{ab}#0", f"{ab}#1"
        else:
            a = t(f"vector.load {hs}[{t.idx(k)}] : {hst}, {v}")
            b = t(f"vector.load {hs}[{t.idx(half + k)}] : {hst}, {v}")
        ra = t(f"arith.subf {t(f'arith.mulf {a}, {cos} : {v}')}, {t(f'arith.mulf {b}, {sin} : {v}')} : {v}")
        rb = t(f"arith.addf {t(f'arith.mulf {a}, {sin} : {v}')}, {t(f'arith.mulf {b}, {cos} : {v}')} : {v}")
        if interleaved:
            store(2 * k, t(f"vector.interleave {ra}, {rb} : {v} -> {v2}"), 2 * w)
        else:
            store(k, ra, w)
            store(half + k, rb, w)


def _copy_head(t: Text, hs: str, d: int, store) -> None:
    w = _lanes(d)
    for k in range(0, d, w):
        store(k, t(f"vector.load {hs}[{t.idx(k)}] : memref<{d}xf32>, {fvec(w)}"), w)


def _row_store(t: Text, mem: str, mem_t: str, el: str, prefix: list[str], col0: str):
    def store(off: int, val: str, lanes: int) -> None:
        col = t(f"arith.addi {col0}, {t.idx(off)} : index")
        store_from_f32(t, val, mem, prefix + [col], mem_t, el, lanes)
    return store


def _rows_loop(t: Text, mem: str, mem_t: str) -> None:
    n = t(f"memref.dim {mem}, {t.idx(0)} : {mem_t}")
    t.open(f"scf.forall (%row) in ({n})")


@register_lowering("rope", "cpu")
def _rope(e: Emitter, args):
    x, freqs, offs, clen = args
    d, inter = e.attrs["head_dim"], e.attrs["interleaved"]
    out_t = tensor_type(e.out_types[0])
    heads = ir.ShapedType(x.type).shape[1] // d
    t = Text()
    xm, xt = to_buffer(t, "%x", x.type)
    fm, ft = to_buffer(t, "%freqs", freqs.type)
    offm, offt = to_buffer(t, "%offs", offs.type)
    clm, clt = to_buffer(t, "%clen", clen.type)
    omt = memref_of(out_t)
    om = alloc_like(t, xm, xt, omt)
    batch = t(f"memref.dim {clm}, {t.idx(0)} : {clt}")
    _rows_loop(t, xm, xt)
    row = _Row(t, offm, offt, clm, clt, batch, (fm, ft))
    hs = t(f"memref.alloca() : memref<{d}xf32>")
    t.for_("%hh", t.idx(0), t.idx(heads), t.idx(1))
    col0 = t(f"arith.muli %hh, {t.idx(d)} : index")
    _load_head(t, hs, d, xm, xt, _el(x), col0)
    _rope_head(t, hs, d, (fm, ft, _el(freqs)), row.pos, inter,
               _row_store(t, om, omt, str(out_t.element_type), ["%row"], col0))
    t.close()
    t.close()
    out = t(f"bufferization.to_tensor {om} restrict writable : {omt} to {out_t}")
    sig = [f"%x: {x.type}", f"%freqs: {freqs.type}", f"%offs: {offs.type}", f"%clen: {clen.type}"]
    return inline_mlir(args, finish(t, sig, out, str(out_t)))


@register_lowering("kv_cache_store", "cpu")
def _kv_cache_store(e: Emitter, args):
    x, blocks, offs, clen, lut = args
    page, nkv, d = cache_dims(blocks, "kv_cache_store")
    kind, layer = e.attrs["kind"], e.attrs["layer"]
    t = Text()
    xm, xt = to_buffer(t, "%x", x.type)
    offm, offt = to_buffer(t, "%offs", offs.type)
    clm, clt = to_buffer(t, "%clen", clen.type)
    lutm, lutt = to_buffer(t, "%lut", lut.type)
    batch = t(f"memref.dim {clm}, {t.idx(0)} : {clt}")
    _rows_loop(t, xm, xt)
    row = _Row(t, offm, offt, clm, clt, batch, None, (lutm, lutt),
               ("%blocks", str(blocks.type), page))
    hs = t(f"memref.alloca() : memref<{d}xf32>")
    t.for_("%hh", t.idx(0), t.idx(nkv), t.idx(1))
    _load_head(t, hs, d, xm, xt, _el(x), t(f"arith.muli %hh, {t.idx(d)} : index"))
    prefix = [row.page, t.idx(kind), t.idx(layer), row.slot, "%hh"]
    _copy_head(t, hs, d, _row_store(t, "%blocks", str(blocks.type), _el(blocks), prefix, t.idx(0)))
    t.close()
    t.close()
    sig = [f"%x: {x.type}", f"%blocks: {blocks.type}", f"%offs: {offs.type}",
           f"%clen: {clen.type}", f"%lut: {lut.type}"]
    return inline_mlir(args, finish(t, sig))


@register_lowering("rope_split_store", "cpu")
def _rope_split_store(e: Emitter, args):
    qkv, freqs, offs, clen, lut, blocks = args[:6]
    a = e.attrs
    nh, nkv, d, inter, layer = a["n_heads"], a["n_kv_heads"], a["head_dim"], a["interleaved"], a["layer"]
    page = cache_dims(blocks, "rope_split_store")[0]
    out_t = tensor_type(e.out_types[0])
    t = Text()
    xm, xt = to_buffer(t, "%qkv", qkv.type)
    fm, ft = to_buffer(t, "%freqs", freqs.type)
    offm, offt = to_buffer(t, "%offs", offs.type)
    clm, clt = to_buffer(t, "%clen", clen.type)
    lutm, lutt = to_buffer(t, "%lut", lut.type)
    norms = [None, None]
    if len(args) == 8:
        for i, name in ((0, "%qw"), (1, "%kw")):
            wm, wt = to_buffer(t, name, args[6 + i].type)
            norms[i] = (wm, wt, _el(args[6 + i]), float(a.get("qk_norm_eps") or 1e-6))
    omt = memref_of(out_t)
    n_rows = t(f"memref.dim {xm}, {t.idx(0)} : {xt}")
    om = t(f"memref.alloc({n_rows}) : {omt}") if ir.ShapedType(out_t).is_dynamic_dim(0) \
        else t(f"memref.alloc() : {omt}")
    batch = t(f"memref.dim {clm}, {t.idx(0)} : {clt}")
    _rows_loop(t, xm, xt)
    row = _Row(t, offm, offt, clm, clt, batch, (fm, ft), (lutm, lutt),
               ("%blocks", str(blocks.type), page))
    hs = t(f"memref.alloca() : memref<{d}xf32>")
    el, bel = _el(qkv), _el(blocks)
    freqs_ = (fm, ft, _el(freqs))
    t.for_("%hh", t.idx(0), t.idx(nh), t.idx(1))
    col0 = t(f"arith.muli %hh, {t.idx(d)} : index")
    _load_head(t, hs, d, xm, xt, el, col0, norms[0])
    _rope_head(t, hs, d, freqs_, row.pos, inter,
               _row_store(t, om, omt, str(out_t.element_type), ["%row"], col0))
    t.close()
    t.for_("%hh", t.idx(0), t.idx(nkv), t.idx(1))
    kcol = t(f"arith.addi {t(f'arith.muli %hh, {t.idx(d)} : index')}, {t.idx(nh * d)} : index")
    _load_head(t, hs, d, xm, xt, el, kcol, norms[1])
    k_prefix = [row.page, t.idx(0), t.idx(layer), row.slot, "%hh"]
    _rope_head(t, hs, d, freqs_, row.pos, inter,
               _row_store(t, "%blocks", str(blocks.type), bel, k_prefix, t.idx(0)))
    vcol = t(f"arith.addi {kcol}, {t.idx(nkv * d)} : index")
    _load_head(t, hs, d, xm, xt, el, vcol)
    v_prefix = [row.page, t.idx(1), t.idx(layer), row.slot, "%hh"]
    _copy_head(t, hs, d, _row_store(t, "%blocks", str(blocks.type), bel, v_prefix, t.idx(0)))
    t.close()
    t.close()
    out = t(f"bufferization.to_tensor {om} restrict writable : {omt} to {out_t}")
    sig = [f"%qkv: {qkv.type}", f"%freqs: {freqs.type}", f"%offs: {offs.type}",
           f"%clen: {clen.type}", f"%lut: {lut.type}", f"%blocks: {blocks.type}"]
    if len(args) == 8:
        sig += [f"%qw: {args[6].type}", f"%kw: {args[7].type}"]
    return inline_mlir(args, finish(t, sig, out, str(out_t)))
