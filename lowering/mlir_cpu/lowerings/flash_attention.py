"""CPU lowering of flash_attention_ragged over the paged KV cache, written as MLIR text.

scf.forall over (sequence, KV head) (the pool splits it over the threads); the G = NH/NKV query
heads sharing that KV head stay together (GQA) and the allowed keys stream by in tiles of C
keys. Rows go in blocks of R, two paths:

Full blocks (R rows; all of a prefill but each sequence's tail): GR = R*G query vectors lie
along the vector lanes (GR = two vectors of the target: 32 with AVX-512, 16 with AVX2), with Q
kept transposed and pre-scaled, Qt[D][GR], and the task's K and V rows gathered from their
pages once (f32, contiguous; AMX: bf16, flash_attention_amx.py). Per key tile:
  S^T[C][GR] = K Qt   register blocks of NK keys x GR queries (a K element broadcast times a
                      Qt row), the matmul kernel's shape: no horizontal sums;
  softmax             mask, running max, exp and sums go down the key axis, lane by lane;
  O[GR][D] += P V     register blocks of MQ queries x DV vectors of head_dim (a P element
                      broadcast times a V row).
Tail blocks and decode (fewer rows): flash_decode.py, in a second forall over (sequence, key
split) with every KV head in a task, and a third that merges the splits. What both paths share
(the kernel's names, key ranges, page addressing, output rows): flash_attention_base.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from mlir import ir

from ...registry import register_lowering
from ..emit import Emitter, tensor_type
from .attention import (VW, Text, alloc_like, cache_dims, finish, fvec, load_f32, memref_of,
                        sequence_span, to_buffer)
from . import flash_attention_amx as amx_tiles
from .flash_attention_base import (KEY_TILE, NEG_INF, _Kernel, _key_range, _page_slot,
                                   _write_rows, lane_softmax)
from .flash_decode import merge_pass, split_count, tail_pass
from .kernel_text import transpose
from .linalg import inline_mlir

# -- full blocks: queries along the lanes -----------------------------------------------------------
@dataclass(frozen=True)
class LaneTiles:
    """Tile sizes of the full-block path for L lanes and a register file of `regs` vectors."""
    rows: int   # R
    gr: int     # query vectors per block, R * G
    nv: int     # vectors of queries (GR padded to whole vectors)
    nk: int     # keys per S^T register block
    mq: int     # queries per P V register block
    dv: int     # head_dim vectors per P V register block

    @staticmethod
    def pick(g: int, d: int, lanes: int, regs: int) -> "LaneTiles | None":
        if d % lanes:
            return None
        rows = max(1, 2 * lanes // g)
        gr = rows * g
        nv = -(-gr // lanes)
        budget = (regs - nv - 2) // nv     # accumulators left after the Qt row and a broadcast
        nk = max(x for x in (1, 2, 4, 8) if x <= max(1, budget))
        dv = max(x for x in (1, 2, 4) if (d // lanes) % x == 0)
        mq = max(x for x in range(1, 9) if gr % x == 0 and x * dv + dv + 1 <= regs)
        return LaneTiles(rows, gr, nv, nk, mq, dv)


def _full_block(k: _Kernel, lt: LaneTiles, lanes: int, r0: str, page: int, sc: dict) -> None:
    """The block of lt.rows rows at r0, queries along the lanes (see the module docstring)."""
    t, d, g, c, el = k.t, k.d, k.g, KEY_TILE, k.el
    v, vi = fvec(lanes), f"vector<{lanes}xi32>"
    grp = lt.nv * lanes
    qt, qtt, st, stt = sc.get("qt"), f"memref<{d}x{grp}xf32>", sc["st"], f"memref<{c}x{grp}xf32>"
    os_, ost, lm, lmt = sc["os"], f"memref<{lt.gr}x{d}xf32>", sc["lm"], f"memref<3x{grp}xf32>"
    neg, zero = t.const(NEG_INF, v), t.const("0.0", v)
    tiles = amx_tiles.amx_applies(k.amx, el, lt.gr, grp, d)

    def qrow(fi: str) -> tuple[str, str]:
        """(row, first column) of query vector fi of the block."""
        r = t(f"arith.divui {fi}, {t.idx(g)} : index")
        gg = t(f"arith.remui {fi}, {t.idx(g)} : index")
        row = t(f"arith.addi {t(f'arith.addi {k.o0}, {r0} : index')}, {r} : index")
        head = t(f"arith.addi {t(f'arith.muli %h, {t.idx(g)} : index')}, {gg} : index")
        return row, t(f"arith.muli {head}, {t.idx(d)} : index")
    # Qt: Q transposed and scaled (lanes past GR stay zero); O, max, sum and alpha reset.
    t.for_("%fi", t.idx(0), t.idx(lt.gr), t.idx(1))
    row, col0 = qrow("%fi")
    scale = t.const(f"{float(k.scale):.17e}", v)
    by_rows = not tiles and lt.gr % lanes      # else whole groups of lanes vectors: transposes
    t.for_("%fd", t.idx(0), t.idx(d), t.idx(lanes))
    t.stmt(f"vector.store {zero}, {os_}[%fi, %fd] : {ost}, {v}")
    if by_rows:
        col = t(f"arith.addi {col0}, %fd : index")
        x = t(f"arith.mulf {load_f32(t, k.qm, [row, col], k.qmt, el, lanes)}, {scale} : {v}")
        for lane in range(lanes):
            xe = t(f"vector.extract {x}[{lane}] : f32 from {v}")
            dl = t(f"arith.addi %fd, {t.idx(lane)} : index")
            t.stmt(f"memref.store {xe}, {qt}[{dl}, %fi] : {qtt}")
    t.close()
    t.close()
    if tiles:
        amx_tiles.pack_queries(k, qrow, d, sc)
    elif not by_rows:
        for q0 in range(0, lt.gr, lanes):
            t.for_("%fe", t.idx(0), t.idx(d), t.idx(lanes))
            rows = []
            for n in range(lanes):
                row, col0 = qrow(t.idx(q0 + n))
                col = t(f"arith.addi {col0}, %fe : index")
                rows.append(t(f"arith.mulf {load_f32(t, k.qm, [row, col], k.qmt, el, lanes)}, "
                              f"{scale} : {v}"))
            for i, r in enumerate(transpose(t, rows, lanes)):
                dl = t(f"arith.addi %fe, {t.idx(i)} : index")
                t.stmt(f"vector.store {r}, {qt}[{dl}, {t.idx(q0)}] : {qtt}, {v}")
            t.close()
    for u in range(lt.nv):
        t.stmt(f"vector.store {neg}, {lm}[{t.idx(0)}, {t.idx(u * lanes)}] : {lmt}, {v}")
        t.stmt(f"vector.store {zero}, {lm}[{t.idx(1)}, {t.idx(u * lanes)}] : {lmt}, {v}")
    qlo, kstart, kend = _key_range(k, r0, t.idx(lt.rows))
    if tiles:   # tiles at multiples of 32 (the mask drops the keys before the true start)
        kstart = t(f"arith.muli {t(f'arith.divui {kstart}, {t.idx(c)} : index')}, {t.idx(c)} : index")
    kend_v = t(f"vector.broadcast {t(f'arith.index_cast {kend} : index to i32')} : i32 to {vi}")
    qlo_v = t(f"vector.broadcast {t(f'arith.index_cast {qlo} : index to i32')} : i32 to {vi}")
    qpos = []
    for u in range(lt.nv):
        rows_of = t.const("[" + ", ".join(str((u * lanes + i) // g) for i in range(lanes)) + "]", vi)
        qpos.append(t(f"arith.addi {qlo_v}, {rows_of} : {vi}"))
    t.for_("%fk0", kstart, kend, t.idx(c))
    if tiles:
        amx_tiles.scores(k, d, sc, st, stt, "%fk0")
    else:
        row0 = t(f"arith.subi %fk0, {sc['kv_base']} : index")   # the tile's first gathered row
        _scores(k, lt, lanes, st, stt, qt, qtt, sc, row0)
    _softmax(k, lt, lanes, st, stt, lm, lmt, kend_v, qpos, scale if tiles else None)
    if tiles:   # P V a key tile late (amx_tiles.accumulate says why), then this tile's P staged
        rel = t(f"arith.subi %fk0, {kstart} : index")
        slot = t(f"arith.remui {t(f'arith.divui {rel}, {t.idx(c)} : index')}, {t.idx(2)} : index")
        t.open(f"scf.if {t(f'arith.cmpi ugt, %fk0, {kstart} : index')}")
        amx_tiles.accumulate(k, d, sc, os_, ost, t(f"arith.subi {t.idx(1)}, {slot} : index"),
                             t(f"arith.subi %fk0, {t.idx(c)} : index"))
        t.close()
        amx_tiles.stage_p(k, sc, st, stt, lm, lmt, slot)
    else:
        kcnt = t.min(t.idx(c), t(f"arith.subi {kend}, %fk0 : index"))
        _accumulate(k, lt, lanes, st, stt, os_, ost, lm, lmt, sc, row0, kcnt)
    t.close()   # %fk0
    if tiles:   # the last key tile's P V
        t.open(f"scf.if {t(f'arith.cmpi ugt, {kend}, {kstart} : index')}")
        span = t(f"arith.subi {kend}, {kstart} : index")
        n = t(f"arith.divui {t(f'arith.subi {span}, {t.idx(1)} : index')}, {t.idx(c)} : index")
        last = t(f"arith.addi {kstart}, {t(f'arith.muli {n}, {t.idx(c)} : index')} : index")
        amx_tiles.accumulate(k, d, sc, os_, ost, t(f"arith.remui {n}, {t.idx(2)} : index"), last)
        t.close()
    sums = t(f"memref.subview {lm}[1, 0] [1, {lt.gr}] [1, 1] : {lmt} to "
             f"memref<{lt.gr}xf32, strided<[1], offset: {grp}>>")
    _write_rows(k, os_, ost, sums, f"memref<{lt.gr}xf32, strided<[1], offset: {grp}>>", r0,
                t.idx(lt.gr), lanes, "%fw")


def _gather_rows(k: _Kernel, lanes: int, page: int, kbase: str, count: str,
                 kind: int) -> tuple[str, str]:
    """The task's K (kind 0) or V (1) rows of keys kbase .. kbase + count as f32, [count, D]
    (heap, 4 x count x D bytes; freed at the task's end by the deallocation pass), read from
    the pages once a task. In the cache the rows lie a page slot apart (4 KB for 8 heads of 128
    f32), all in the same L1 sets, and every later row block reads them again: V copied per
    key tile and block, K read in place (the earlier forms) took 12.8-13.6 ms for the f32
    attention of 512 tokens against 11.0-11.3 (2,048 tokens: 203 against 168 ms)."""
    t, d, v = k.t, k.d, fvec(lanes)
    rt = f"memref<?x{d}xf32>"
    rows = t(f"memref.alloc({t(f'arith.maxui {count}, {t.idx(1)} : index')}) "
             f"{{alignment = 64 : i64}} : {rt}")
    t.for_("%fvg", t.idx(0), count, t.idx(1))
    pg, sl = _page_slot(k, t(f"arith.addi {kbase}, %fvg : index"), page)
    for u in range(0, d, lanes):
        x = load_f32(t, "%blocks", [pg, t.idx(kind), t.idx(k.layer), sl, "%h", t.idx(u)], k.bt,
                     k.el, lanes)
        t.stmt(f"vector.store {x}, {rows}[%fvg, {t.idx(u)}] : {rt}, {v}")
    t.close()
    return rows, rt


def _scores(k: _Kernel, lt: LaneTiles, lanes: int, st: str, stt: str, qt: str, qtt: str,
            sc: dict, krow0: str):
    """S^T = K Qt for the key tile at row krow0 of the task's gathered K (sc["kall"]), NK keys
    at a time (vector FMAs: a K element broadcast times a Qt row)."""
    t, d, c = k.t, k.d, KEY_TILE
    v = fvec(lanes)
    zero = t.const("0.0", v)
    t.for_("%fjb", t.idx(0), t.idx(c), t.idx(lt.nk))
    keys = [t(f"arith.addi %fjb, {t.idx(j)} : index") for j in range(lt.nk)]
    # Keys past the gathered ones (the last tile's) read the last: finite, and P is 0 there.
    rows_k = [t.clamp(t(f"arith.addi {krow0}, {j} : index"), sc["kv_count"]) for j in keys]
    n_acc = lt.nk * lt.nv
    init = ", ".join(f"%fa{i} = {zero}" for i in range(n_acc))
    res = t(f"scf.for %fdd = {t.idx(0)} to {t.idx(d)} step {t.idx(1)} iter_args({init}) -> "
            f"({', '.join([v] * n_acc)}) {{", n=n_acc)
    t.depth += 1
    qrow = [t(f"vector.load {qt}[%fdd, {t.idx(u * lanes)}] : {qtt}, {v}") for u in range(lt.nv)]
    nxt = []
    for j in range(lt.nk):
        kx = t(f"memref.load {sc['kall']}[{rows_k[j]}, %fdd] : {sc['kat']}")
        kb = t(f"vector.broadcast {kx} : f32 to {v}")
        nxt += [t(f"vector.fma {kb}, {qrow[u]}, %fa{j * lt.nv + u} : {v}") for u in range(lt.nv)]
    t.stmt(f"scf.yield {', '.join(nxt)} : {', '.join([v] * n_acc)}")
    t.depth -= 1
    t.stmt("}")
    for j in range(lt.nk):
        for u in range(lt.nv):
            t.stmt(f"vector.store {res}#{j * lt.nv + u}, {st}[{keys[j]}, {t.idx(u * lanes)}] : "
                   f"{stt}, {v}")
    t.close()


def _softmax(k: _Kernel, lt: LaneTiles, lanes: int, st: str, stt: str, lm: str, lmt: str,
             kend_v: str, qpos: list[str], scale: str | None) -> None:
    """Online softmax of the key tile down the key axis, one lane per query: P^T into st,
    max / sum / alpha into lm (S scaled here when `scale`, a vector, is given)."""
    t = k.t
    for u in range(lt.nv):
        col = t.idx(u * lanes)
        lane_softmax(t, lanes=lanes, st=st, stt=stt, col=col, key0="%fk0", kend_v=kend_v,
                     qpos=qpos[u], lm=lm, lmt=lmt, lm_idx=lambda i, col=col: f"{t.idx(i)}, {col}",
                     mask=k.mask, window=k.window, softcap=k.softcap, scale=scale)


def _accumulate(k: _Kernel, lt: LaneTiles, lanes: int, st: str, stt: str, os_: str, ost: str,
                lm: str, lmt: str, sc: dict, vrow0: str, kcnt: str) -> None:
    """O = alpha O + P V, MQ queries x DV vectors of head_dim at a time (vector FMAs), over the
    tile's first kcnt keys (the rest are past the block's keys, P is 0 there: the last tile
    skips them), V from the task's gathered rows (sc["vall"], the tile's first at vrow0)."""
    t, d = k.t, k.d
    v = fvec(lanes)
    vt, vtt = sc["vall"], sc["vat"]
    t.for_("%fqb", t.idx(0), t.idx(lt.gr), t.idx(lt.mq))
    t.for_("%fdc", t.idx(0), t.idx(d), t.idx(lt.dv * lanes))
    qs = [t(f"arith.addi %fqb, {t.idx(q)} : index") for q in range(lt.mq)]
    cols = [t(f"arith.addi %fdc, {t.idx(u * lanes)} : index") for u in range(lt.dv)]
    accs = []
    for q in range(lt.mq):
        a = t(f"vector.broadcast {t(f'memref.load {lm}[{t.idx(2)}, {qs[q]}] : {lmt}')} : f32 to {v}")
        for u in range(lt.dv):
            o = t(f"vector.load {os_}[{qs[q]}, {cols[u]}] : {ost}, {v}")
            accs.append(t(f"arith.mulf {o}, {a} : {v}"))
    n_acc = lt.mq * lt.dv
    init = ", ".join(f"%fo{i} = {a}" for i, a in enumerate(accs))
    res = t(f"scf.for %fv = {t.idx(0)} to {kcnt} step {t.idx(1)} iter_args({init}) -> "
            f"({', '.join([v] * n_acc)}) {{", n=n_acc)
    t.depth += 1
    vr = t.clamp(t(f"arith.addi {vrow0}, %fv : index"), sc["kv_count"])   # inside it, always
    vv = [t(f"vector.load {vt}[{vr}, {cols[u]}] : {vtt}, {v}") for u in range(lt.dv)]
    nxt = []
    for q in range(lt.mq):
        pb = t(f"vector.broadcast {t(f'memref.load {st}[%fv, {qs[q]}] : {stt}')} : f32 to {v}")
        nxt += [t(f"vector.fma {pb}, {vv[u]}, %fo{q * lt.dv + u} : {v}") for u in range(lt.dv)]
    t.stmt(f"scf.yield {', '.join(nxt)} : {', '.join([v] * n_acc)}")
    t.depth -= 1
    t.stmt("}")
    for q in range(lt.mq):
        for u in range(lt.dv):
            t.stmt(f"vector.store {res}#{q * lt.dv + u}, {os_}[{qs[q]}, {cols[u]}] : {ost}, {v}")
    t.close()   # %fdc
    t.close()   # %fqb


# -- the per-query-vector path ---------------------------------------------------------------------
def flash_attention_text(args, out_t: ir.Type, *, n_heads: int, n_kv_heads: int, head_dim: int,
                         layer: int, mask: str, window: int | None, scale: float,
                         lanes: int = VW, registers: int = 16,
                         softcap: float | None = None, amx: bool = False) -> str:
    """The kernel for a target with `lanes` f32 lanes per vector and `registers` vectors (and
    AMX tiles for a bf16 cache's full blocks when `amx`)."""
    q, blocks, offs, clen, lut = args
    d, g = head_dim, n_heads // n_kv_heads
    page = cache_dims(blocks, "flash_attention_ragged")[0]
    t = Text()
    qm, qmt = to_buffer(t, "%q", q.type)
    offm, offt = to_buffer(t, "%offs", offs.type)
    clm, clt = to_buffer(t, "%clen", clen.type)
    lutm, lutt = to_buffer(t, "%lut", lut.type)
    omt = memref_of(out_t)
    om = alloc_like(t, qm, qmt, omt)
    nb = t(f"memref.dim {clm}, {t.idx(0)} : {clt}")
    lut_cols, npages = t.dim(lutm, 1, lutt), t.dim("%blocks", 0, str(blocks.type))
    max_tokens = t(f"arith.muli {lut_cols}, {t.idx(page)} : index")
    el = str(ir.ShapedType(q.type).element_type)

    def kernel(r: str) -> _Kernel:
        """The per-sequence values of sequence %b, inside a forall over it."""
        o0, n, cl = sequence_span(t, offm, offt, clm, clt, "%b", r, max_tokens)
        return _Kernel(t, d, g, layer, mask, window, el, qm, qmt, om, omt, str(blocks.type),
                       lutm, lutt, o0, cl, t(f"arith.addi {cl}, {n} : index"),
                       t(f"memref.alloca() : memref<{KEY_TILE}xindex>"),
                       t(f"memref.alloca() : memref<{KEY_TILE}xindex>"), scale, softcap,
                       lut_cols, npages, amx), n

    def tail0(n: str) -> str:
        """First row of a sequence's tail: past its whole blocks of lt.rows (all rows without
        the full-block path)."""
        if lt is None:
            return t.idx(0)
        return t(f"arith.muli {t(f'arith.divui {n}, {t.idx(lt.rows)} : index')}, {t.idx(lt.rows)} : index")
    lt = LaneTiles.pick(g, d, lanes, registers)
    rows = t.dim(qm, 0, qmt)
    if lt is not None:
        t.open(f"scf.forall (%b, %h) in ({nb}, {n_kv_heads})")
        k, n = kernel(rows)
        grp = lt.nv * lanes
        sc = dict(st=t(f"memref.alloca() : memref<{KEY_TILE}x{grp}xf32>"),
                  os=t(f"memref.alloca() : memref<{lt.gr}x{d}xf32>"),
                  lm=t(f"memref.alloca() : memref<3x{grp}xf32>"))
        tiles = amx_tiles.amx_applies(amx, el, lt.gr, grp, d)
        # The keys the full blocks read, gathered once a task: from the first block's first
        # (AMX: down to a multiple of 32, where its key tiles start) to the end; none without a
        # full block.
        kb = _key_range(k, t.idx(0), t.idx(lt.rows))[1]
        if tiles:
            kb = t(f"arith.muli {t(f'arith.divui {kb}, {t.idx(KEY_TILE)} : index')}, "
                   f"{t.idx(KEY_TILE)} : index")
        full = t(f"arith.cmpi uge, {n}, {t.idx(lt.rows)} : index")
        cnt = t(f"arith.select {full}, {t(f'arith.subi {k.total}, {kb} : index')}, "
                f"{t.idx(0)} : index")
        if not tiles:   # the vector path's Qt, K and V
            sc["qt"] = t(f"memref.alloca() : memref<{d}x{grp}xf32>")
            sc["kall"], sc["kat"] = _gather_rows(k, lanes, page, kb, cnt, 0)
            sc["vall"], sc["vat"] = _gather_rows(k, lanes, page, kb, cnt, 1)
            sc["kv_base"], sc["kv_count"] = kb, cnt
            # Query lanes past GR must read as zeros (they are computed, never written out).
            t.stmt(f"linalg.fill ins({t.const('0.0', 'f32')} : f32) outs({sc['qt']} : "
                   f"memref<{d}x{grp}xf32>)")
        else:
            sc.update(amx_tiles.scratch(t, d))
            amx_tiles.gather_sequence(k, lambda kp: _page_slot(k, kp, page), d, kb, cnt, sc)
        t.for_("%fr0", t.idx(0), tail0(n), t.idx(lt.rows))
        _full_block(k, lt, lanes, "%fr0", page, sc)
        t.close()
        t.close()   # forall
    # The tail rows: key splits of every KV head's run, then their merge (flash_decode.py).
    nh = g * n_kv_heads
    splits = split_count(t, rows)
    part = (t(f"memref.alloc({splits}, {rows}) : memref<?x?x{nh}xf32>"),
            t(f"memref.alloc({splits}, {rows}) : memref<?x?x{nh}xf32>"),
            t(f"memref.alloc({splits}, {rows}) : memref<?x?x{nh}x{d}xf32>"))
    t.open(f"scf.forall (%b, %s) in ({nb}, {splits})")
    k, n = kernel(rows)
    r0 = tail0(n)
    tail_pass(k, n_kv_heads, r0, t(f"arith.subi {n}, {r0} : index"), page, registers, splits, part)
    t.close()
    t.open(f"scf.forall (%b, %qh) in ({nb}, {nh})")
    k, n = kernel(rows)
    r0 = tail0(n)
    merge_pass(k, nh, r0, t(f"arith.subi {n}, {r0} : index"), splits, part)
    t.close()
    out = t(f"bufferization.to_tensor {om} restrict writable : {omt} to {out_t}")
    sig = [f"%q: {q.type}", f"%blocks: {blocks.type}", f"%offs: {offs.type}",
           f"%clen: {clen.type}", f"%lut: {lut.type}"]
    return finish(t, sig, out, str(out_t))


@register_lowering("flash_attention_ragged", "cpu")
def _flash_attention(e: Emitter, args):
    a = e.attrs
    text = flash_attention_text(args, tensor_type(e.out_types[0]), n_heads=a["n_heads"],
                                n_kv_heads=a["n_kv_heads"], head_dim=a["head_dim"],
                                layer=a["layer"], mask=a["mask"], window=a.get("window"),
                                scale=float(a["scale"]), lanes=e.cpu.f32_lanes,
                                registers=e.cpu.vector_registers, softcap=a.get("softcap"),
                                amx=e.matmul.amx)
    return inline_mlir(args, text)
