"""The two matmuls of flash_attention.py's full-block path on AMX tiles (bf16 query and cache,
a target with amx): per key tile of 32 keys and block of 32 query vectors,

  S^T[32 keys][32 queries] = K Q^T   A: K rows (kall), B: the block's queries in bf16 pairs (qv,
                                     built once a block); 16 tdpbf16ps, stored into the f32
                                     scratch the softmax reads (scaled there: Q is not rounded
                                     after a scale);
  O[32 queries][D] = alpha O + P V   A: P in bf16 (P^T transposed by vector shuffles), B: V in
                                     key pairs (vall: rows 2i and 2i+1 interleaved); O in
                                     memory, its rows scaled by alpha with vectors where alpha
                                     is not 1, 4 tdpbf16ps a 32-wide chunk; one key tile late
                                     (P and alpha staged in two slots), so that P's stores have
                                     left the store buffer when its tiles load it.

kall and vall hold the whole sequence's keys of the task's KV head, gathered from the pages
once a task (gather_sequence), so the key tiles start at multiples of 32 (the mask drops keys
before a window's start). P goes through bf16 as in torch's CPU flash attention for bf16;
every sum is f32. The softmax and the output rows stay the vector code's.
"""
from __future__ import annotations

from .kernel_text import transpose

TX, TC = "!amx.tile<16x32xbf16>", "!amx.tile<16x16xf32>"
GR = 32   # query vectors a block: two tiles of 16


def amx_applies(amx: bool, el: str, gr: int, grp: int, d: int) -> bool:
    """Whether the full-block path of this kernel can take the tile matmuls."""
    return amx and el == "bf16" and gr == GR and grp == GR and d % 32 == 0


def scratch(t, d: int) -> dict:
    """Stack buffers of a task: qv (also as i32 pairs), and two slots of P (pb) and of alpha
    (al): P V runs a key tile late (accumulate)."""
    def buf(nbytes: int) -> str:
        return t(f"memref.alloca() {{alignment = 64 : i64}} : memref<{nbytes}xi8>")

    def view(b: str, nbytes: int, ty: str) -> str:
        return t(f"memref.view {b}[{t.idx(0)}][] : memref<{nbytes}xi8> to {ty}")
    qb, pb, al = buf(d * GR * 2), buf(2 * GR * 32 * 2), buf(2 * GR * 4)
    return dict(qv=view(qb, d * GR * 2, f"memref<{d // 2}x{2 * GR}xbf16>"),
                qvi=view(qb, d * GR * 2, f"memref<{d // 2}x{GR}xi32>"),
                pb=view(pb, 2 * GR * 32 * 2, f"memref<{2 * GR}x32xbf16>"),
                al=view(al, 2 * GR * 4, f"memref<2x{GR}xf32>"))


def gather_sequence(k, page_slot, d: int, kbase: str, count: str, sc: dict) -> None:
    """The task's K rows, sc["kall"] [NK, D], and V in key pairs, sc["vall"] [NK/2, 2D] (row
    i: keys 2i and 2i+1 interleaved), of keys kbase .. kbase + count (kbase a multiple of 32;
    the keys its full blocks read: none without one), NK = count rounded up to 32, rows past
    count zero (P is 0 there, and 0 x a stale NaN would not be). Once a task: each block of rows
    read them tile by tile, re-gathered, 32 times over for 512 rows."""
    t = k.t
    up = t(f"arith.addi {count}, {t.idx(31)} : index")
    nk = t(f"arith.muli {t(f'arith.divui {up}, {t.idx(32)} : index')}, {t.idx(32)} : index")
    kat, vat = f"memref<?x{d}xbf16>", f"memref<?x{2 * d}xbf16>"
    kall = t(f"memref.alloc({nk}) {{alignment = 64 : i64}} : {kat}")
    vall = t(f"memref.alloc({t(f'arith.divui {nk}, {t.idx(2)} : index')}) "
             f"{{alignment = 64 : i64}} : {vat}")
    last = t(f"arith.subi {count}, {t.idx(1)} : index")

    def row(j: str, kind: int, col: int, width: int) -> str:
        """width bf16 of key kbase + j (zero from count on) at column col."""
        ok = t(f"arith.cmpi ult, {j}, {count} : index")
        pg, sl = page_slot(t(f"arith.addi {kbase}, {t(f'arith.minui {j}, {last} : index')} : index"))
        vt = f"vector<{width}xbf16>"
        x = t(f"vector.load %blocks[{pg}, {t.idx(kind)}, {t.idx(k.layer)}, {sl}, %h, "
              f"{t.idx(col)}] : {k.bt}, {vt}")
        return t(f"arith.select {ok}, {x}, {t.const('0.0', vt)} : {vt}")
    t.for_("%xg", t.idx(0), nk, t.idx(1))
    for c in range(0, d, 32):
        t.stmt(f"vector.store {row('%xg', 0, c, 32)}, {kall}[%xg, {t.idx(c)}] : {kat}, "
               f"vector<32xbf16>")
    t.close()
    inter = ", ".join(f"{i}, {i + 16}" for i in range(16))
    vh = "vector<16xbf16>"
    t.for_("%xp", t.idx(0), t(f"arith.divui {nk}, {t.idx(2)} : index"), t.idx(1))
    j0 = t(f"arith.muli %xp, {t.idx(2)} : index")
    j1 = t(f"arith.addi {j0}, {t.idx(1)} : index")
    for c in range(0, d, 16):
        x = t(f"vector.shuffle {row(j0, 1, c, 16)}, {row(j1, 1, c, 16)} [{inter}] : {vh}, {vh}")
        t.stmt(f"vector.store {x}, {vall}[%xp, {t.idx(2 * c)}] : {vat}, vector<32xbf16>")
    t.close()
    sc.update(kall=kall, kat=kat, vall=vall, vat=vat, kbase=kbase)


def pack_queries(k, qrow, d: int, sc: dict) -> None:
    """qv[i][2n + t] = Q[query vector n][2i + t] for the block's 32 query vectors; qrow(n) ->
    (row, first column) of query vector n (an index op sequence inside the loop)."""
    t = k.t
    vi, vf = "vector<16xi32>", "vector<16xf32>"
    qvt = f"memref<{d // 2}x{GR}xi32>"
    for n0 in (0, 16):
        t.for_("%xq", t.idx(0), t.idx(d), t.idx(32))
        rows = []
        for n in range(16):
            row, col0 = qrow(t.idx(n0 + n))
            x = t(f"vector.load {k.qm}[{row}, {t(f'arith.addi {col0}, %xq : index')}] : "
                  f"{k.qmt}, vector<32xbf16>")
            rows.append(t(f"vector.bitcast {x} : vector<32xbf16> to {vf}"))
        # Row n holds vector n's 16 pairs; transposed, row i holds pair i of the 16 vectors.
        pi0 = t(f"arith.divui %xq, {t.idx(2)} : index")
        for i, r in enumerate(transpose(t, rows, 16)):
            ri = t(f"vector.bitcast {r} : {vf} to {vi}")
            t.stmt(f"vector.store {ri}, {sc['qvi']}[{t(f'arith.addi {pi0}, {t.idx(i)} : index')}, "
                   f"{t.idx(n0)}] : {qvt}, {vi}")
        t.close()


def scores(k, d: int, sc: dict, st: str, stt: str, k0: str) -> None:
    """st = K Q^T for the key tile at k0 (a multiple of 32), from gather_sequence's rows."""
    t = k.t
    c = [[t(f"amx.tile_zero : {TC}") for _ in range(2)] for _ in range(2)]
    qvt = f"memref<{d // 2}x{2 * GR}xbf16>"
    r0 = t(f"arith.subi {k0}, {sc['kbase']} : index")
    rows = [r0, t(f"arith.addi {r0}, {t.idx(16)} : index")]
    for s in range(d // 32):
        a = [t(f"amx.tile_load {sc['kall']}[{rows[i]}, {t.idx(32 * s)}] : {sc['kat']} into "
               f"{TX}") for i in range(2)]
        b = [t(f"amx.tile_load {sc['qv']}[{t.idx(16 * s)}, {t.idx(32 * j)}] : {qvt} into {TX}")
             for j in range(2)]
        c = [[t(f"amx.tile_mulf {a[i]}, {b[j]}, {c[i][j]} : {TX}, {TX}, {TC}") for j in range(2)]
             for i in range(2)]
    for i in range(2):
        for j in range(2):
            t.stmt(f"amx.tile_store {st}[{t.idx(16 * i)}, {t.idx(16 * j)}], {c[i][j]} : {stt}, "
                   f"{TC}")


def stage_p(k, sc: dict, st: str, stt: str, lm: str, lmt: str, slot: str) -> None:
    """P^T (in st, f32) transposed into pb's slot in bf16, and alpha (lm row 2) into al's:
    what accumulate of this key tile reads one tile later."""
    t = k.t
    vf, vh = "vector<16xf32>", "vector<16xbf16>"
    pbt = f"memref<{2 * GR}x32xbf16>"
    p0 = t(f"arith.muli {slot}, {t.idx(GR)} : index")
    for q0 in (0, 16):
        for j0 in (0, 16):
            rows = [t(f"vector.load {st}[{t.idx(j0 + r)}, {t.idx(q0)}] : {stt}, {vf}")
                    for r in range(16)]
            for i, r in enumerate(transpose(t, rows, 16)):
                t.stmt(f"vector.store {t(f'arith.truncf {r} : {vf} to {vh}')}, "
                       f"{sc['pb']}[{t(f'arith.addi {p0}, {t.idx(q0 + i)} : index')}, "
                       f"{t.idx(j0)}] : {pbt}, {vh}")
    for q0 in (0, 16):
        a = t(f"vector.load {lm}[{t.idx(2)}, {t.idx(q0)}] : {lmt}, {vf}")
        t.stmt(f"vector.store {a}, {sc['al']}[{slot}, {t.idx(q0)}] : memref<2x{GR}xf32>, {vf}")


def accumulate(k, d: int, sc: dict, os_: str, ost: str, slot: str, k0: str) -> None:
    """O = alpha O + P V for the key tile at k0, its P and alpha staged in `slot`. Called one
    key tile after stage_p (the next tile's scores and softmax in between): a tile load waits
    until the vector stores it reads have left the store buffer, and right after stage_p the
    first tdpbf16ps of P V waited on it (15% of the kernel's samples on one tile store)."""
    t = k.t
    vf = "vector<16xf32>"
    pbt = f"memref<{2 * GR}x32xbf16>"
    rel = t(f"arith.subi {k0}, {sc['kbase']} : index")
    kp = t(f"arith.divui {rel}, {t.idx(2)} : index")
    # O's rows times alpha, skipped where alpha is exactly 1 (the row's max did not move: most
    # rows of most tiles once the first keys are in).
    t.for_("%xo", t.idx(0), t.idx(GR), t.idx(1))
    a_s = t(f"memref.load {sc['al']}[{slot}, %xo] : memref<2x{GR}xf32>")
    one = t.const("1.0", "f32")
    t.open(f"scf.if {t(f'arith.cmpf une, {a_s}, {one} : f32')}")
    al = t(f"vector.broadcast {a_s} : f32 to {vf}")
    for c in range(0, d, 16):
        o = t(f"vector.load {os_}[%xo, {t.idx(c)}] : {ost}, {vf}")
        t.stmt(f"vector.store {t(f'arith.mulf {o}, {al} : {vf}')}, {os_}[%xo, {t.idx(c)}] : "
               f"{ost}, {vf}")
    t.close()
    t.close()
    p0 = t(f"arith.muli {slot}, {t.idx(GR)} : index")
    p = [t(f"amx.tile_load {sc['pb']}[{t(f'arith.addi {p0}, {t.idx(16 * i)} : index')}, "
           f"{t.idx(0)}] : {pbt} into {TX}") for i in range(2)]
    for dc in range(0, d, 32):
        v = [t(f"amx.tile_load {sc['vall']}[{kp}, {t.idx(2 * dc + 32 * j)}] : {sc['vat']} "
               f"into {TX}") for j in range(2)]
        for i in range(2):
            for j in range(2):
                at = f"{os_}[{t.idx(16 * i)}, {t.idx(dc + 16 * j)}]"
                c = t(f"amx.tile_load {at} : {ost} into {TC}")
                c = t(f"amx.tile_mulf {p[i]}, {v[j]}, {c} : {TX}, {TX}, {TC}")
                t.stmt(f"amx.tile_store {at}, {c} : {ost}, {TC}")
