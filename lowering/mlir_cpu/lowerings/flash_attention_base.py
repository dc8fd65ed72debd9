"""What both paths of the CPU flash attention share (flash_attention.py's full blocks and
flash_decode.py's per-row path): the kernel's buffer and sequence names, each row block's key
range, page addressing of a key tile, and the normalised output rows."""
from __future__ import annotations

from dataclasses import dataclass

from .attention import Text, fvec, mask_vec, softcap_vec, store_from_f32, vexp, vmax_keep

KEY_TILE = 32   # keys per tile: K and V tiles stay in L1 for a block's queries
NEG_INF = "0xFF800000"


@dataclass
class _Kernel:
    """What both paths share: names of buffers, scratch and per-sequence values."""
    t: Text
    d: int
    g: int
    layer: int
    mask: str
    window: int | None
    el: str
    qm: str
    qmt: str
    om: str
    omt: str
    bt: str
    lutm: str
    lutt: str
    o0: str
    cl: str
    total: str
    pgs: str
    sls: str
    scale: float
    softcap: float | None = None
    lut_cols: str = ""   # lookup-table columns and cache pages: the clamps' bounds
    npages: str = ""
    amx: bool = False    # full blocks take flash_attention_amx.py's tile matmuls


def lane_softmax(t: Text, *, lanes: int, st: str, stt: str, col: str, key0: str, kend_v: str,
                 qpos: str, lm: str, lmt: str, lm_idx, mask: str, window: int | None = None,
                 softcap: float | None = None, scale: str | None = None) -> None:
    """Online softmax of one vector of query lanes over a key tile: column `col` of S^T
    [KEY_TILE][lanes...] holds its scores, tile key j sits at position key0 + j. Keys at or
    past kend_v (an i32 vector), or masked from the lane's query position qpos, become -inf;
    P = exp(S - max) replaces S, and the running max, sum and alpha at lm[lm_idx(0 | 1 | 2)]
    are updated. S is scaled first when `scale` (a vector) is given, then soft-capped.
    Shared by the flash attention's lane path and the MLA kernels (mla_lanes.py)."""
    v, vi, b = fvec(lanes), f"vector<{lanes}xi32>", f"vector<{lanes}xi1>"
    neg, zero = t.const(NEG_INF, v), t.const("0.0", v)

    def keys(init: str, body) -> str:
        """acc = body(j, acc) for every key j of the tile; the final acc."""
        j, acc = t.fresh("%sj"), t.fresh("%sa")
        res = t(f"scf.for {j} = {t.idx(0)} to {t.idx(KEY_TILE)} step {t.idx(1)} "
                f"iter_args({acc} = {init}) -> ({v}) {{")
        t.depth += 1
        t.stmt(f"scf.yield {body(j, acc)} : {v}")
        t.depth -= 1
        t.stmt("}")
        return res

    def masked(j: str, acc: str) -> str:
        s = t(f"vector.load {st}[{j}, {col}] : {stt}, {v}")
        if scale is not None:
            s = t(f"arith.mulf {s}, {scale} : {v}")
        s = softcap_vec(t, s, softcap, lanes)
        kp = t(f"arith.index_cast {t(f'arith.addi {key0}, {j} : index')} : index to i32")
        kp = t(f"vector.broadcast {kp} : i32 to {vi}")
        ok = t(f"arith.cmpi slt, {kp}, {kend_v} : {vi}")
        mk = mask_vec(t, mask, qpos, kp, window, lanes)
        if mk is not None:
            ok = t(f"arith.andi {ok}, {mk} : {b}")
        s = t(f"arith.select {ok}, {s}, {neg} : {b}, {v}")
        t.stmt(f"vector.store {s}, {st}[{j}, {col}] : {stt}, {v}")
        return vmax_keep(t, acc, s, lanes)
    m_tile = keys(neg, masked)
    m_old = t(f"vector.load {lm}[{lm_idx(0)}] : {lmt}, {v}")
    m_new = t(f"arith.maximumf {m_old}, {m_tile} : {v}")
    # A lane with every key masked so far keeps max -inf: exp against 0 instead gives p = 0
    # and alpha = 1 rather than NaN from -inf - -inf.
    dead = t(f"arith.cmpf oeq, {m_new}, {neg} : {v}")
    msafe = t(f"arith.select {dead}, {zero}, {m_new} : {b}, {v}")
    alpha = vexp(t, t(f"arith.subf {m_old}, {msafe} : {v}"), lanes)

    def exp(j: str, acc: str) -> str:
        s = t(f"vector.load {st}[{j}, {col}] : {stt}, {v}")
        p = vexp(t, t(f"arith.subf {s}, {msafe} : {v}"), lanes)
        p = t(f"arith.select {t(f'arith.cmpf oeq, {s}, {neg} : {v}')}, {zero}, {p} : {b}, {v}")
        t.stmt(f"vector.store {p}, {st}[{j}, {col}] : {stt}, {v}")
        return t(f"arith.addf {acc}, {p} : {v}")
    lsum = keys(zero, exp)
    l_old = t(f"vector.load {lm}[{lm_idx(1)}] : {lmt}, {v}")
    t.stmt(f"vector.store {t(f'math.fma {l_old}, {alpha}, {lsum} : {v}')}, {lm}[{lm_idx(1)}] : "
           f"{lmt}, {v}")
    t.stmt(f"vector.store {m_new}, {lm}[{lm_idx(0)}] : {lmt}, {v}")
    t.stmt(f"vector.store {alpha}, {lm}[{lm_idx(2)}] : {lmt}, {v}")


def _key_range(k: _Kernel, r0: str, rows: str) -> tuple[str, str, str]:
    """(first query position, first key, end of keys) of rows [r0, r0 + rows): the union over
    the rows (the mask makes it exact per row)."""
    t, window = k.t, k.window
    qlo = t(f"arith.addi {k.cl}, {r0} : index")
    qhi = t(f"arith.addi {qlo}, {rows} : index")
    kend = k.total if k.mask in ("null", "sliding_window_noncausal") else qhi
    kstart = t.idx(0)
    if k.mask in ("sliding_window_causal", "sliding_window_noncausal"):
        lo = t(f"arith.subi {t(f'arith.addi {qlo}, {t.idx(1)} : index')}, {t.idx(window)} : index")
        kstart = t(f"arith.maxsi {lo}, {t.idx(0)} : index")
    elif k.mask == "chunked_causal":
        kstart = t(f"arith.muli {t(f'arith.divui {qlo}, {t.idx(window)} : index')}, {t.idx(window)} : index")
    return qlo, kstart, kend


def _tile_pages(k: _Kernel, k0: str, kend: str, page: int, j: str) -> None:
    """Page and slot of each key of the tile at k0 (past the range: repeat the last key)."""
    t, it = k.t, f"memref<{KEY_TILE}xindex>"
    kcnt = t.min(t.idx(KEY_TILE), t(f"arith.subi {kend}, {k0} : index"))
    t.for_(j, t.idx(0), t.idx(KEY_TILE), t.idx(1))
    jj = t.min(j, t(f"arith.subi {kcnt}, {t.idx(1)} : index"))
    pg, sl = _page_slot(k, t(f"arith.addi {k0}, {jj} : index"), page)
    t.stmt(f"memref.store {pg}, {k.pgs}[{j}] : {it}")
    t.stmt(f"memref.store {sl}, {k.sls}[{j}] : {it}")
    t.close()


def _page_slot(k: _Kernel, kp: str, page: int) -> tuple[str, str]:
    """(page id, slot) of key position kp of sequence %b; the page-table column and the page
    id are clamped into their tables, so bad metadata stays in bounds."""
    t = k.t
    col = t.clamp(t(f"arith.divui {kp}, {t.idx(page)} : index"), k.lut_cols)
    pg = t.clamp(t.load_index(k.lutm, ["%b", col], k.lutt), k.npages)
    return pg, t(f"arith.remui {kp}, {t.idx(page)} : index")


def _prefetch_tile(k: _Kernel, k0: str, kend: str, page: int) -> None:
    """Prefetch into L2 the K and V rows of the key tile at k0 (keys past the range: the last
    key's again; every index clamped like the loads'). A decode step reads each key once, and
    a tile's 32 rows lie a page slot of all KV heads apart (4 KB for 8 heads of 128 f32), a
    pattern the hardware prefetchers follow poorly: without this the decode attention at
    context 4096 read its 33 MB of K/V at ~10 GB/s while the matmuls beside it streamed 24 GB/s
    (BENCHMARKS.md, CPU decode attention, 2026-12-04)."""
    t = k.t
    last = t(f"arith.subi {kend}, {t.idx(1)} : index")
    t.for_("%pj", t.idx(0), t.idx(KEY_TILE), t.idx(1))
    pg, sl = _page_slot(k, t.min(t(f"arith.addi {k0}, %pj : index"), last), page)
    for kind in (0, 1):
        _prefetch_row(k, (pg, t.idx(kind), sl), "%h", 2)
    t.close()


def _prefetch_row(k: _Kernel, at: tuple[str, str, str], head: str, locality: int) -> None:
    """Prefetch one K or V row (at: page, kind (0 K, 1 V), slot) of a KV head, every cache
    line of it, with the locality hint (3: L1, 2: L2)."""
    t = k.t
    pg, kind, sl = at
    line = 64 // (2 if k.el in ("bf16", "f16") else 4)       # elements a cache line
    for off in range(0, k.d, line):
        t.stmt(f"memref.prefetch %blocks[{pg}, {kind}, {t.idx(k.layer)}, {sl}, {head}, "
               f"{t.idx(off)}], read, locality<{locality}>, data : {k.bt}")


def _write_rows(k: _Kernel, os_: str, sct: str, ls: str, mt1: str, r0: str, nvec: str,
                dw: int, iv: str) -> None:
    """Out rows of query vectors [0, nvec) of the block at r0: O / l (0 when l is 0)."""
    t, g, d = k.t, k.g, k.d
    vd = fvec(dw)
    t.for_(iv, t.idx(0), nvec, t.idx(1))
    r = t(f"arith.divui {iv}, {t.idx(g)} : index")
    gg = t(f"arith.remui {iv}, {t.idx(g)} : index")
    row = t(f"arith.addi {t(f'arith.addi {k.o0}, {r0} : index')}, {r} : index")
    head = t(f"arith.addi {t(f'arith.muli %h, {t.idx(g)} : index')}, {gg} : index")
    vals = [t(f"vector.load {os_}[{iv}, {t.idx(c * dw)}] : {sct}, {vd}") for c in range(d // dw)]
    store_row(k, vals, t(f"memref.load {ls}[{iv}] : {mt1}"), row, head, dw)
    t.close()


def store_row(k: _Kernel, vals: list[str], lval: str, row: str, head: str, dw: int) -> None:
    """Output row `row`, query head `head`: the unnormalised O vectors `vals` (dw lanes each)
    over the softmax sum lval, 0 where no key was allowed (lval 0), in the output's dtype."""
    t, d = k.t, k.d
    vd = fvec(dw)
    zero, one = t.const("0.0", "f32"), t.const("1.0", "f32")
    pos = t(f"arith.cmpf ogt, {lval}, {zero} : f32")
    rcp = t(f"arith.divf {one}, {lval} : f32")
    inv = t(f"vector.broadcast {t(f'arith.select {pos}, {rcp}, {zero} : f32')} : f32 to {vd}")
    col0 = t(f"arith.muli {head}, {t.idx(d)} : index")
    for c, x in enumerate(vals):
        store_from_f32(t, t(f"arith.mulf {x}, {inv} : {vd}"), k.om,
                       [row, t(f"arith.addi {col0}, {t.idx(c * dw)} : index")], k.omt, k.el, dw)
