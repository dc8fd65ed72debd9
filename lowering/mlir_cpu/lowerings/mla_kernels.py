"""CPU kernels of mla_decode and mla_prefill (MLIR text), vectorized with the lane-attention
core of mla_lanes.py.

mla_decode (absorbed): scf.forall over (sequence, group of HG heads); per new token, q_nope is
taken into latent space through w_uk (outer products along kv_lora_rank), the HG heads' latent
queries [q_lat | q_rope] lie along the lanes, and they attend over the latent cache rows read in
place from their pages (keys kv_lora_rank + rope wide, values the first kv_lora_rank); the
normalized latent output goes through w_uv (outer products along v_head_dim).

mla_prefill (decompressed): scf.forall over (sequence, head); the sequence's cached + new keys
go by chunks of min(buffer_size, PREFILL_CHUNK) tokens: each chunk's K (nope part c_kv . w_k,
dot products along kv_lora_rank; rope part k_pe) and V (c_kv @ w_uv, outer products along
v_head_dim) are decompressed into a workspace of that many rows, DECOMP_KEYS keys sharing each
weight load, then every block of 2 x lanes
new tokens (queries along the lanes) streams the chunk's keys through its online-softmax state.
The workspace per task is bounded by buffer_size tokens whatever the sequence length.
"""
from __future__ import annotations

from mlir import ir

from .attention import (alloc_like, cache_dims, finish, load_f32, memref_of, sequence_span,
                        store_from_f32, to_buffer)
from .kernel_text import KernelText, hsum
from .mla_lanes import KEY_TILE, LaneState, LaneTiles, attend, pow2_divisor, reset_state

PREFILL_CHUNK = 256   # keys decompressed at a time (fewer when buffer_size is smaller)


class _Io:
    """Buffers of an MLA attention op: q, the latent cache, ragged metadata, the two weights."""

    def __init__(self, k: KernelText, args, out_t):
        t = k.t
        q, blocks, offs, clen, lut, w1, w2 = args[:7]
        self.qm, self.qmt = to_buffer(t, "%q", q.type)
        self.offm, self.offt = to_buffer(t, "%offs", offs.type)
        self.clm, self.clt = to_buffer(t, "%clen", clen.type)
        self.lutm, self.lutt = to_buffer(t, "%lut", lut.type)
        self.w1, self.w1t = to_buffer(t, "%w1", w1.type)
        self.w2, self.w2t = to_buffer(t, "%w2", w2.type)
        self.w1_heads = ir.ShapedType(w1.type).rank == 3   # w_uk [NH, nope, R], else w_k
        self.bt = str(blocks.type)
        self.page = cache_dims(blocks, "mla")[0]
        # Bounds of the metadata clamps: q rows, lookup-table columns, cache pages.
        self.rows_q = t.dim(self.qm, 0, self.qmt)
        self.lut_cols = t.dim(self.lutm, 1, self.lutt)
        self.pages = t.dim("%blocks", 0, self.bt)
        self.el = str(ir.ShapedType(q.type).element_type)
        self.bel = str(ir.ShapedType(blocks.type).element_type)
        self.omt = memref_of(out_t)
        self.om = alloc_like(t, self.qm, self.qmt, self.omt)
        self.sig = [f"%q: {q.type}", f"%blocks: {blocks.type}", f"%offs: {offs.type}",
                    f"%clen: {clen.type}", f"%lut: {lut.type}", f"%w1: {w1.type}",
                    f"%w2: {w2.type}"]
        self.rows = self.rowst = None   # the prefill plan's buffer_row_offsets, when given
        if len(args) == 10:
            names = ("%rows", "%starts", "%total")
            self.sig += [f"{nm}: {a.type}" for nm, a in zip(names, args[7:])]
            self.rows, self.rowst = to_buffer(t, "%rows", args[7].type)

    def scalar(self, t, mem: str, idx: list[str], mem_t: str, el: str) -> str:
        x = t(f"memref.load {mem}[{', '.join(idx)}] : {mem_t}")
        return x if el == "f32" else t(f"arith.extf {x} : {el} to f32")

    def page_slot(self, k: KernelText, b: str, pos: str) -> tuple[str, str]:
        t = k.t
        # Page-table column and page id clamped into their tables: bad metadata stays in bounds.
        col = t.clamp(k.ix("divui", pos, self.page), self.lut_cols)
        page = t.clamp(t.load_index(self.lutm, [b, col], self.lutt), self.pages)
        return page, k.ix("remui", pos, self.page)


def _seq(k: KernelText, io: _Io, b: str) -> tuple[str, str, str]:
    """(first row, new tokens, cached tokens) of sequence b, clamped into the buffers."""
    return sequence_span(k.t, io.offm, io.offt, io.clm, io.clt, b, io.rows_q,
                         k.ix("muli", io.lut_cols, io.page))


def _lane_positions(k: KernelText, lt: LaneTiles, first: str, step_lanes: bool) -> list[str]:
    """i32 vectors of query positions per query vector: all `first` (heads of one token), or
    first + lane (one head of consecutive tokens)."""
    t, vi = k.t, f"vector<{lt.lanes}xi32>"
    base = t(f"vector.broadcast {t(f'arith.index_cast {first} : index to i32')} : i32 to {vi}")
    if not step_lanes:
        return [base] * lt.nv
    return [t(f"arith.addi {base}, "
              f"{t.const('[' + ', '.join(str(u * lt.lanes + i) for i in range(lt.lanes)) + ']', vi)}"
              f" : {vi}") for u in range(lt.nv)]


def _cache_keys(k: KernelText, io: _Io, b: str, layer: int, kend: str):
    """(tile_setup, key_ref, key_elem, val_vec) over the paged latent cache rows of sequence b
    (keys past kend repeat the last one)."""
    t, it = k.t, f"memref<{KEY_TILE}xindex>"
    pgs, sls = t(f"memref.alloca() : {it}"), t(f"memref.alloca() : {it}")

    def setup(k0):
        last = k.ix("subi", kend, 1)

        def key(j, _):
            pg, sl = io.page_slot(k, b, t.min(k.ix("addi", k0, j), last))
            t.stmt(f"memref.store {pg}, {pgs}[{j}] : {it}")
            t.stmt(f"memref.store {sl}, {sls}[{j}] : {it}")
            return []
        k.loop(0, KEY_TILE, 1, body=key)

    def ref(j):
        return [t(f"memref.load {pgs}[{j}] : {it}"), t.idx(0), t.idx(layer),
                t(f"memref.load {sls}[{j}] : {it}"), t.idx(0)]

    def elem(r, dd):
        return io.scalar(t, "%blocks", r + [dd], io.bt, io.bel)
    return setup, ref, elem


def _vectors(t, mem: str, idx: list[str], mem_t: str, el: str, width: int) -> str:
    return load_f32(t, mem, idx, mem_t, el, width)


def _max_new_tokens(k: KernelText, io: _Io) -> str:
    t = k.t
    nb = t(f"memref.dim {io.clm}, {t.idx(0)} : {io.clt}")

    def seq(b, acc):
        return [t(f"arith.maxui {acc[0]}, {_seq(k, io, b)[1]} : index")]
    return k.loop(0, nb, 1, [t.idx(0)], "index", seq)[0]


def _text(args, out_t, body) -> str:
    """The module of one MLA kernel: body(k, io) writes into io.om."""
    k = KernelText()
    io = _Io(k, args, out_t)
    body(k, io)
    t = k.t
    out = t(f"bufferization.to_tensor {io.om} restrict writable : {io.omt} to {out_t}")
    return finish(t, io.sig, out, str(out_t))


def mla_decode_text(args, out_t, **dims) -> str:
    return _text(args, out_t, lambda k, io: _decode(k, io, **dims))


def mla_prefill_text(args, out_t, *, buffer_size: int, **dims) -> str:
    return _text(args, out_t, lambda k, io: _prefill(k, io, buffer_size=buffer_size, **dims))


def mla_attention_text(args, out_t, *, buffer_size: int, absorb_max: int, **dims) -> str:
    """One kernel, one form per call: absorbed while the batch's most new tokens per sequence
    is at most absorb_max, decompressed otherwise (an scf.if; only the branch taken runs)."""
    def body(k, io):
        t = k.t
        absorbed = t(f"arith.cmpi ule, {_max_new_tokens(k, io)}, {t.idx(absorb_max)} : index")
        k.if_(absorbed, lambda: _decode(k, io, **dims),
              lambda: _prefill(k, io, buffer_size=buffer_size, **dims))
    return _text(args, out_t, body)


def _decode(k: KernelText, io: _Io, *, nh: int, nope: int, rope: int, v: int, r: int,
            layer: int, scale: float, lanes: int, regs: int) -> None:
    t = k.t
    qk, width = nope + rope, r + rope
    hg = max(x for x in range(1, min(nh, lanes) + 1) if nh % x == 0)
    lt = LaneTiles.pick(hg, r, lanes, regs)
    grp, vr, vv, vp = lt.grp, pow2_divisor(r, lanes), pow2_divisor(v, lanes), pow2_divisor(rope, lanes)
    b, g = k.fresh("b"), k.fresh("g")
    nb = t(f"memref.dim {io.clm}, {t.idx(0)} : {io.clt}")
    t.open(f"scf.forall ({b}, {g}) in ({nb}, {nh // hg})")
    o0, n, cl = _seq(k, io, b)
    qt_t, st_t, lm_t = f"memref<{width}x{grp}xf32>", f"memref<{KEY_TILE}x{grp}xf32>", f"memref<3x{grp}xf32>"
    o_t, ql_t = f"memref<{hg}x{r}xf32>", f"memref<{hg}x{width}xf32>"
    qt, st, lm, om, ql = (t(f"memref.alloca() : {ty}") for ty in (qt_t, st_t, lm_t, o_t, ql_t))
    t.stmt(f"linalg.fill ins({t.const('0.0', 'f32')} : f32) outs({qt} : {qt_t})")
    state = LaneState(qt, qt_t, st, st_t, lm, lm_t, [], om, o_t, t.idx(0))
    h0 = k.ix("muli", g, hg)
    sc_r, sc_p = t.const(f"{scale:.17e}", f"vector<{vr}xf32>"), t.const(f"{scale:.17e}", f"vector<{vp}xf32>")

    def token(i, _):
        row, qpos = k.ix("addi", o0, i), k.ix("addi", cl, i)

        def head(h, _):   # [q_nope @ w_uk[hh] | q_rope] * scale into ql[h]
            hh = k.ix("addi", h0, h)
            qcol = k.ix("muli", hh, qk)
            rb = _block(r, vr)

            def rblock(c0, _):
                cols = [k.ix("addi", c0, u * vr) for u in range(rb // vr)]

                def dstep(dd, accs):
                    qd = io.scalar(t, io.qm, [row, k.ix("addi", qcol, dd)], io.qmt, io.el)
                    qb = t(f"vector.broadcast {qd} : f32 to vector<{vr}xf32>")
                    return [t(f"vector.fma {qb}, {_vectors(t, io.w1, [hh, dd, c], io.w1t, io.el, vr)}, "
                              f"{a} : vector<{vr}xf32>") for c, a in zip(cols, accs)]
                res = k.loop(0, nope, 1, [t.const("0.0", f"vector<{vr}xf32>")] * len(cols),
                             f"vector<{vr}xf32>", dstep)
                for c, a in zip(cols, res):
                    t.stmt(f"vector.store {t(f'arith.mulf {a}, {sc_r} : vector<{vr}xf32>')}, "
                           f"{ql}[{h}, {c}] : {ql_t}, vector<{vr}xf32>")
                return []
            k.loop(0, r, rb, body=rblock)
            for c in range(0, rope, vp):
                x = _vectors(t, io.qm, [row, k.ix("addi", qcol, nope + c)], io.qmt, io.el, vp)
                t.stmt(f"vector.store {t(f'arith.mulf {x}, {sc_p} : vector<{vp}xf32>')}, "
                       f"{ql}[{h}, {t.idx(r + c)}] : {ql_t}, vector<{vp}xf32>")

            def tr(dd, _):
                x = t(f"memref.load {ql}[{h}, {dd}] : {ql_t}")
                t.stmt(f"memref.store {x}, {qt}[{dd}, {h}] : {qt_t}")
                return []
            k.loop(0, width, 1, body=tr)
            return []
        k.loop(0, hg, 1, body=head)
        reset_state(k, lt, state, r)
        kend = k.ix("addi", qpos, 1)
        setup, ref, elem = _cache_keys(k, io, b, layer, kend)
        attend(k, lt, state, d=width, dv=r, kstart=t.idx(0), kend=kend,
               qpos=_lane_positions(k, lt, qpos, False), tile_setup=setup, key_ref=ref,
               key_elem=elem, val_vec=lambda rf, col: _vectors(t, "%blocks", rf + [col], io.bt,
                                                               io.bel, lt.vw))

        def out_head(h, _):   # out = (O_lat / l) @ w_uv[hh]
            hh = k.ix("addi", h0, h)
            inv = _inverse(k, t(f"memref.load {lm}[{t.idx(1)}, {h}] : {lm_t}"))
            invb = t(f"vector.broadcast {inv} : f32 to vector<{vv}xf32>")
            vb = _block(v, vv)

            def vblock(c0, _):
                cols = [k.ix("addi", c0, u * vv) for u in range(vb // vv)]

                def rstep(rr, accs):
                    ob = t(f"vector.broadcast {t(f'memref.load {om}[{h}, {rr}] : {o_t}')} : f32 "
                           f"to vector<{vv}xf32>")
                    return [t(f"vector.fma {ob}, {_vectors(t, io.w2, [hh, rr, c], io.w2t, io.el, vv)}, "
                              f"{a} : vector<{vv}xf32>") for c, a in zip(cols, accs)]
                res = k.loop(0, r, 1, [t.const("0.0", f"vector<{vv}xf32>")] * len(cols),
                             f"vector<{vv}xf32>", rstep)
                base = k.ix("muli", hh, v)
                for c, a in zip(cols, res):
                    y = t(f"arith.mulf {a}, {invb} : vector<{vv}xf32>")
                    store_from_f32(t, y, io.om, [row, k.ix("addi", base, c)], io.omt, io.el, vv)
                return []
            k.loop(0, v, vb, body=vblock)
            return []
        k.loop(0, hg, 1, body=out_head)
        return []
    k.loop(0, n, 1, body=token)
    t.close()


def _block(n: int, w: int, most: int = 8) -> int:
    """Columns per register block: w-wide vectors, at most `most` of them, dividing n."""
    return w * max(x for x in range(1, most + 1) if (n // w) % x == 0)


def _inverse(k: KernelText, lsum: str) -> str:
    """1 / lsum, 0 when lsum is 0 (a query without keys)."""
    t = k.t
    zero, one = t.const("0.0", "f32"), t.const("1.0", "f32")
    pos = t(f"arith.cmpf ogt, {lsum}, {zero} : f32")
    return t(f"arith.select {pos}, {t(f'arith.divf {one}, {lsum} : f32')}, {zero} : f32")


def _prefill(k: KernelText, io: _Io, *, nh: int, nope: int, rope: int, v: int, r: int,
             layer: int, scale: float, buffer_size: int, lanes: int, regs: int) -> None:
    t = k.t
    qk = nope + rope
    gr = 2 * lanes
    lt = LaneTiles.pick(gr, v, lanes, regs)
    grp = lt.grp
    chunk = min(buffer_size, PREFILL_CHUNK)
    vr, vv, vp = pow2_divisor(r, lanes), pow2_divisor(v, lanes), pow2_divisor(rope, lanes)
    b, h = k.fresh("b"), k.fresh("h")
    nb = t(f"memref.dim {io.clm}, {t.idx(0)} : {io.clt}")
    t.open(f"scf.forall ({b}, {h}) in ({nb}, {nh})")
    o0, n, cl = _seq(k, io, b)
    t.open(f"scf.if {t(f'arith.cmpi ugt, {n}, {t.idx(0)} : index')}")   # nothing to attend
    total = k.ix("addi", cl, n)
    nblk = k.ix("divui", k.ix("addi", n, gr - 1), gr)
    # Workspace: K/V of one chunk (+ a tile of padding rows, zeroed: keys past a chunk's end
    # are masked but read), and per block of queries its softmax state and output rows.
    kc_t, vc_t = f"memref<{chunk + KEY_TILE}x{qk}xf32>", f"memref<{chunk + KEY_TILE}x{v}xf32>"
    kc, vc = t(f"memref.alloc() : {kc_t}"), t(f"memref.alloc() : {vc_t}")
    for m, ty in ((kc, kc_t), (vc, vc_t)):
        t.stmt(f"linalg.fill ins({t.const('0.0', 'f32')} : f32) outs({m} : {ty})")
    o_t, lm_t = f"memref<?x{v}xf32>", f"memref<?x3x{grp}xf32>"
    ost = t(f"memref.alloc({k.ix('muli', nblk, gr)}) : {o_t}")
    lms = t(f"memref.alloc({nblk}) : {lm_t}")
    qt_t, st_t = f"memref<{qk}x{grp}xf32>", f"memref<{KEY_TILE}x{grp}xf32>"
    qt, st = t(f"memref.alloca() : {qt_t}"), t(f"memref.alloca() : {st_t}")
    t.stmt(f"linalg.fill ins({t.const('0.0', 'f32')} : f32) outs({qt} : {qt_t})")

    def state(blk):
        return LaneState(qt, qt_t, st, st_t, lms, lm_t, [blk], ost, o_t, k.ix("muli", blk, gr))
    k.loop(0, nblk, 1, body=lambda blk, _: reset_state(k, lt, state(blk), v) or [])
    qcol = k.ix("muli", h, qk)
    last_row = k.ix("subi", k.ix("addi", o0, n), 1)
    scale_c = t.const(f"{scale:.17e}", "f32")

    def chunk_step(s, hi):
        cnt = t.min(t.idx(chunk), k.ix("subi", hi, s))
        _decompress(k, io, b, h, s, cnt, kc, kc_t, vc, vc_t, nope=nope, rope=rope, v=v, r=r,
                    layer=layer, vr=vr, vv=vv, vp=vp)
        send = k.ix("addi", s, cnt)

        def block(blk, _):
            r0 = k.ix("muli", blk, gr)
            qlo = k.ix("addi", cl, r0)
            kend = t.min(send, k.ix("addi", qlo, gr))

            def lane(q, _):   # Qt[:, q] = scale * q of row r0 + q (the last row past the end)
                row = t.min(k.ix("addi", k.ix("addi", o0, r0), q), last_row)

                def col(dd, _):
                    x = io.scalar(t, io.qm, [row, k.ix("addi", qcol, dd)], io.qmt, io.el)
                    t.stmt(f"memref.store {t(f'arith.mulf {x}, {scale_c} : f32')}, {qt}[{dd}, {q}] : {qt_t}")
                    return []
                k.loop(0, qk, 1, body=col)
                return []
            k.loop(0, gr, 1, body=lane)
            tile = {}   # the tile's first key, as a workspace row

            def setup(k0):
                tile["row"] = k.ix("subi", k0, s)
            attend(k, lt, state(blk), d=qk, dv=v, kstart=s, kend=kend,
                   qpos=_lane_positions(k, lt, qlo, True), tile_setup=setup,
                   key_ref=lambda j: k.ix("addi", tile["row"], j),
                   key_elem=lambda row, dd: t(f"memref.load {kc}[{row}, {dd}] : {kc_t}"),
                   val_vec=lambda row, c: t(f"vector.load {vc}[{row}, {c}] : {vc_t}, "
                                            f"vector<{lt.vw}xf32>"))
            return []
        k.loop(0, nblk, 1, body=block)
        return []
    # Buffers of buffer_size K/V rows tile the batch's rows (the prefill plan; without it each
    # sequence starts a buffer); each is decompressed `chunk` keys at a time.
    base = t.load_index(io.rows, [b], io.rowst) if io.rows else t.idx(0)
    bs = buffer_size

    def buffer(gb, _):
        lo = t(f"arith.maxsi {k.ix('subi', k.ix('muli', gb, bs), base)}, {t.idx(0)} : index")
        hi = t.min(k.ix("subi", k.ix("muli", k.ix("addi", gb, 1), bs), base), total)
        return k.loop(lo, hi, chunk, body=lambda s, _: chunk_step(s, hi))
    last = k.ix("divui", k.ix("subi", k.ix("addi", base, total), 1), bs)
    k.loop(k.ix("divui", base, bs), k.ix("addi", last, 1), 1, body=buffer)

    def write(i, _):
        blk, q = k.ix("divui", i, gr), k.ix("remui", i, gr)
        inv = _inverse(k, t(f"memref.load {lms}[{blk}, {t.idx(1)}, {q}] : {lm_t}"))
        invb = t(f"vector.broadcast {inv} : f32 to vector<{vv}xf32>")
        base = k.ix("muli", h, v)
        for c in range(0, v, vv):
            x = t(f"vector.load {ost}[{i}, {t.idx(c)}] : {o_t}, vector<{vv}xf32>")
            store_from_f32(t, t(f"arith.mulf {x}, {invb} : vector<{vv}xf32>"), io.om,
                           [k.ix("addi", o0, i), k.ix("addi", base, c)], io.omt, io.el, vv)
        return []
    k.loop(0, n, 1, body=write)
    t.close()   # scf.if
    t.close()   # (the deallocation pass frees the workspace at the end of each task)


# Keys decompressed together: each weight vector loaded is used by DECOMP_KEYS keys, so the
# weights (2 x 256 KB a head at DeepSeek's sizes) stream from L2 once per group instead of once
# per key (they were the bound: ~1 load per FMA).
DECOMP_KEYS = 4
_K_OUTS = 4        # K outputs (dot products along R) a register block holds per key
_V_VECS = 4        # V column vectors a register block holds per key


def _decompress(k: KernelText, io: _Io, b: str, h: str, s: str, cnt: str, kc, kc_t, vc, vc_t,
                *, nope: int, rope: int, v: int, r: int, layer: int, vr: int, vv: int,
                vp: int) -> None:
    """Rows [0, cnt) of kc / vc = K / V of head h for the keys at positions s + row:
    K = [c_kv . w_k[h nope + d] for d < nope | k_pe], V = c_kv @ w_uv[h]. Keys go in groups
    of DECOMP_KEYS; a last partial group repeats key cnt - 1 into rows up to cnt + 2, which
    lie in the workspace's padding rows past the chunk (masked by the attention)."""
    t = k.t
    nk = DECOMP_KEYS
    assert nk - 1 <= KEY_TILE   # the padding rows hold a partial group's repeats
    nbk = max(x for x in (_K_OUTS, 2, 1) if nope % x == 0)
    vb = _block(v, vv, _V_VECS)
    last = k.ix("subi", cnt, 1)

    def group(l0, _):
        rows = [k.ix("addi", l0, i) for i in range(nk)]
        ats = []
        for row in rows:
            page, slot = io.page_slot(k, b, k.ix("addi", s, t.min(row, last)))
            ats.append([page, t.idx(0), t.idx(layer), slot, t.idx(0)])

        def dblock(d0, _):
            ds = [k.ix("addi", d0, j) for j in range(nbk)]
            # w_k row h nope + d, or w_uk[h, d] (the same numbers)
            ws = [[h, d] if io.w1_heads else [k.ix("addi", k.ix("muli", h, nope), d)] for d in ds]

            def rstep(rr, accs):
                cs = [_vectors(t, "%blocks", at + [rr], io.bt, io.bel, vr) for at in ats]
                wv = [_vectors(t, io.w1, w + [rr], io.w1t, io.el, vr) for w in ws]
                return [t(f"vector.fma {c}, {w}, {accs[i * nbk + j]} : vector<{vr}xf32>")
                        for i, c in enumerate(cs) for j, w in enumerate(wv)]
            res = k.loop(0, r, vr, [t.const("0.0", f"vector<{vr}xf32>")] * (nk * nbk),
                         f"vector<{vr}xf32>", rstep)
            for i, row in enumerate(rows):
                for j in range(nbk):
                    t.stmt(f"memref.store {hsum(t, res[i * nbk + j], vr)}, "
                           f"{kc}[{row}, {k.ix('addi', d0, j)}] : {kc_t}")
            return []
        k.loop(0, nope, nbk, body=dblock)
        for at, row in zip(ats, rows):
            for c in range(0, rope, vp):
                x = _vectors(t, "%blocks", at + [t.idx(r + c)], io.bt, io.bel, vp)
                t.stmt(f"vector.store {x}, {kc}[{row}, {t.idx(nope + c)}] : {kc_t}, "
                       f"vector<{vp}xf32>")

        def vblock(c0, _):
            cols = [k.ix("addi", c0, u * vv) for u in range(vb // vv)]

            def rstep(rr, accs):
                cbs = [t(f"vector.broadcast {io.scalar(t, '%blocks', at + [rr], io.bt, io.bel)} "
                         f": f32 to vector<{vv}xf32>") for at in ats]
                wv = [_vectors(t, io.w2, [h, rr, c], io.w2t, io.el, vv) for c in cols]
                return [t(f"vector.fma {cb}, {w}, {accs[i * len(cols) + j]} : vector<{vv}xf32>")
                        for i, cb in enumerate(cbs) for j, w in enumerate(wv)]
            res = k.loop(0, r, 1, [t.const("0.0", f"vector<{vv}xf32>")] * (nk * len(cols)),
                         f"vector<{vv}xf32>", rstep)
            for i, row in enumerate(rows):
                for j, c in enumerate(cols):
                    t.stmt(f"vector.store {res[i * len(cols) + j]}, {vc}[{row}, {c}] : {vc_t}, "
                           f"vector<{vv}xf32>")
            return []
        k.loop(0, v, vb, body=vblock)
        return []
    k.loop(0, cnt, nk, body=group)
