"""The two matmuls of flash_attention.py's full-block path on AMX tiles (bf16 query and cache,
a target with amx): per key tile of 32 keys and block of 32 query vectors,

  S^T[32 keys][32 queries] = K Q^T   A: the tile's K rows gathered from their pages (kt), B: the
                                     block's queries in bf16 pairs (qv, built once a block);
                                     16 tdpbf16ps, stored into the f32 scratch the softmax reads
                                     (scaled there: Q is not rounded after a scale);
  O[32 queries][D] = alpha O + P V   A: P in bf16 (P^T transposed by vector shuffles), B: V in
                                     key pairs (vp: rows 2i and 2i+1 interleaved); O in memory,
                                     scaled by alpha with vectors, 4 tdpbf16ps a 32-wide chunk.

P goes through bf16 as in torch's CPU flash attention for bf16; every sum is f32. The softmax
and the output rows stay the vector code's. Scratch: 26 KB of stack a task.
"""
from __future__ import annotations

from .kernel_text import transpose

TX, TC = "!amx.tile<16x32xbf16>", "!amx.tile<16x16xf32>"
GR = 32   # query vectors a block: two tiles of 16


def amx_applies(amx: bool, el: str, gr: int, grp: int, d: int) -> bool:
    """Whether the full-block path of this kernel can take the tile matmuls."""
    return amx and el == "bf16" and gr == GR and grp == GR and d % 32 == 0


def scratch(t, d: int) -> dict:
    """Stack buffers of a task: qv (also as i32 pairs), kt, vp, pb."""
    def buf(nbytes: int) -> str:
        return t(f"memref.alloca() {{alignment = 64 : i64}} : memref<{nbytes}xi8>")

    def view(b: str, nbytes: int, ty: str) -> str:
        return t(f"memref.view {b}[{t.idx(0)}][] : memref<{nbytes}xi8> to {ty}")
    qb, kb, vb, pb = buf(d * GR * 2), buf(32 * d * 2), buf(32 * d * 2), buf(GR * 32 * 2)
    return dict(qv=view(qb, d * GR * 2, f"memref<{d // 2}x{2 * GR}xbf16>"),
                qvi=view(qb, d * GR * 2, f"memref<{d // 2}x{GR}xi32>"),
                kt=view(kb, 32 * d * 2, f"memref<32x{d}xbf16>"),
                vp=view(vb, 32 * d * 2, f"memref<16x{2 * d}xbf16>"),
                pb=view(pb, GR * 32 * 2, f"memref<{GR}x32xbf16>"))


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


def scores(k, key_index, d: int, sc: dict, st: str, stt: str) -> None:
    """st = K Q^T for the key tile whose pages _tile_pages wrote; key_index(j, kind, col)."""
    t = k.t
    ktt = f"memref<32x{d}xbf16>"
    vb = "vector<32xbf16>"
    t.for_("%xj", t.idx(0), t.idx(32), t.idx(1))
    for c in range(0, d, 32):
        x = t(f"vector.load %blocks[{', '.join(key_index('%xj', 0, t.idx(c)))}] : {k.bt}, {vb}")
        t.stmt(f"vector.store {x}, {sc['kt']}[%xj, {t.idx(c)}] : {ktt}, {vb}")
    t.close()
    c = [[t(f"amx.tile_zero : {TC}") for _ in range(2)] for _ in range(2)]
    qvt = f"memref<{d // 2}x{2 * GR}xbf16>"
    for s in range(d // 32):
        a = [t(f"amx.tile_load {sc['kt']}[{t.idx(16 * i)}, {t.idx(32 * s)}] : {ktt} into {TX}")
             for i in range(2)]
        b = [t(f"amx.tile_load {sc['qv']}[{t.idx(16 * s)}, {t.idx(32 * j)}] : {qvt} into {TX}")
             for j in range(2)]
        c = [[t(f"amx.tile_mulf {a[i]}, {b[j]}, {c[i][j]} : {TX}, {TX}, {TC}") for j in range(2)]
             for i in range(2)]
    for i in range(2):
        for j in range(2):
            t.stmt(f"amx.tile_store {st}[{t.idx(16 * i)}, {t.idx(16 * j)}], {c[i][j]} : {stt}, "
                   f"{TC}")


def accumulate(k, key_index, d: int, sc: dict, st: str, stt: str, os_: str, ost: str,
               lm: str, lmt: str) -> None:
    """O = alpha O + P V for the key tile (P^T in st, alpha in lm row 2)."""
    t = k.t
    vf, vh = "vector<16xf32>", "vector<16xbf16>"
    pbt = f"memref<{GR}x32xbf16>"
    for q0 in (0, 16):
        for k0 in (0, 16):
            rows = [t(f"vector.load {st}[{t.idx(k0 + r)}, {t.idx(q0)}] : {stt}, {vf}")
                    for r in range(16)]
            for i, r in enumerate(transpose(t, rows, 16)):
                t.stmt(f"vector.store {t(f'arith.truncf {r} : {vf} to {vh}')}, "
                       f"{sc['pb']}[{t.idx(q0 + i)}, {t.idx(k0)}] : {pbt}, {vh}")
    vpt = f"memref<16x{2 * d}xbf16>"
    inter = ", ".join(f"{i}, {i + 16}" for i in range(16))
    t.for_("%xv", t.idx(0), t.idx(16), t.idx(1))
    j0 = t(f"arith.muli %xv, {t.idx(2)} : index")
    j1 = t(f"arith.addi {j0}, {t.idx(1)} : index")
    for c in range(0, d, 16):
        a = t(f"vector.load %blocks[{', '.join(key_index(j0, 1, t.idx(c)))}] : {k.bt}, {vh}")
        b = t(f"vector.load %blocks[{', '.join(key_index(j1, 1, t.idx(c)))}] : {k.bt}, {vh}")
        x = t(f"vector.shuffle {a}, {b} [{inter}] : {vh}, {vh}")
        t.stmt(f"vector.store {x}, {sc['vp']}[%xv, {t.idx(2 * c)}] : {vpt}, vector<32xbf16>")
    t.close()
    t.for_("%xo", t.idx(0), t.idx(GR), t.idx(1))
    al = t(f"vector.broadcast {t(f'memref.load {lm}[{t.idx(2)}, %xo] : {lmt}')} : f32 to {vf}")
    for c in range(0, d, 16):
        o = t(f"vector.load {os_}[%xo, {t.idx(c)}] : {ost}, {vf}")
        t.stmt(f"vector.store {t(f'arith.mulf {o}, {al} : {vf}')}, {os_}[%xo, {t.idx(c)}] : "
               f"{ost}, {vf}")
    t.close()
    p = [t(f"amx.tile_load {sc['pb']}[{t.idx(16 * i)}, {t.idx(0)}] : {pbt} into {TX}")
         for i in range(2)]
    for dc in range(0, d, 32):
        v = [t(f"amx.tile_load {sc['vp']}[{t.idx(0)}, {t.idx(2 * dc + 32 * j)}] : {vpt} into "
               f"{TX}") for j in range(2)]
        for i in range(2):
            for j in range(2):
                at = f"{os_}[{t.idx(16 * i)}, {t.idx(dc + 16 * j)}]"
                c = t(f"amx.tile_load {at} : {ost} into {TC}")
                c = t(f"amx.tile_mulf {p[i]}, {v[j]}, {c} : {TX}, {TX}, {TC}")
                t.stmt(f"amx.tile_store {at}, {c} : {ost}, {TC}")
