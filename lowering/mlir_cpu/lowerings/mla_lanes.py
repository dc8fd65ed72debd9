"""The attention core of the CPU MLA kernels (MLIR text): query vectors along the vector lanes,
as flash_attention.py's full-block path, over keys given by callbacks (the latent cache rows for
the absorbed form, a decompressed K/V buffer for prefill).

Per tile of KEY_TILE keys, with Qt[D][GRP] the queries transposed and pre-scaled:
  S^T[C][GRP] = K Qt      register blocks of NK keys x NV query vectors (a K element broadcast
                          times a Qt row), no horizontal sums;
  softmax                 mask, running max, exp and sums down the key axis, lane by lane;
  O[GR][DV] = alpha O + P V   register blocks of MQ queries x DB vectors of the value width.
The running max / sum / alpha and O live in caller-owned memory, so a caller can stream keys
through several calls (prefill's decompression chunks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .attention import fvec
from .flash_attention_base import KEY_TILE, NEG_INF, lane_softmax
from .kernel_text import KernelText


def pow2_divisor(n: int, most: int) -> int:
    """The largest power of two <= most that divides n."""
    w = 1
    while w * 2 <= most and n % (w * 2) == 0:
        w *= 2
    return w


@dataclass(frozen=True)
class LaneTiles:
    """Register blocks for GR query vectors over `lanes` lanes, QK width d, value width dv."""
    lanes: int
    gr: int
    nv: int    # vectors of queries
    nk: int    # keys per S^T block
    mq: int    # queries per P V block
    db: int    # value vectors per P V block
    vw: int    # lanes of a value vector (a power of two dividing the value width)

    @staticmethod
    def pick(gr: int, dv: int, lanes: int, regs: int) -> "LaneTiles":
        nv = -(-gr // lanes)
        budget = max(1, (regs - nv - 2) // nv)
        nk = max(x for x in (1, 2, 4, 8) if x <= budget)
        vw = pow2_divisor(dv, lanes)
        db = max(x for x in (1, 2, 4) if (dv // vw) % x == 0)
        mq = max(x for x in range(1, 9) if gr % x == 0 and x * db + db + 1 <= regs)
        return LaneTiles(lanes, gr, nv, nk, mq, db, vw)

    @property
    def grp(self) -> int:
        return self.nv * self.lanes


@dataclass
class LaneState:
    """Caller-owned memory of one block of queries: Qt [d][grp], S^T scratch [KEY_TILE][grp],
    lm [.., 3, grp] (max, sum, alpha at index prefix `lm_at`), O [.., dv] from row `o_row`."""
    qt: str
    qt_t: str
    st: str
    st_t: str
    lm: str
    lm_t: str
    lm_at: list
    o: str
    o_t: str
    o_row: str


def reset_state(k: KernelText, lt: LaneTiles, s: LaneState, dv: int) -> None:
    """max = -inf, sum = 0, O rows = 0 for the block's queries."""
    t = k.t
    v, vo = fvec(lt.lanes), fvec(lt.vw)
    neg, zero, zero_o = t.const(NEG_INF, v), t.const("0.0", v), t.const("0.0", vo)
    for u in range(lt.nv):
        col = t.idx(u * lt.lanes)
        t.stmt(f"vector.store {neg}, {s.lm}[{', '.join(s.lm_at + [t.idx(0), col])}] : {s.lm_t}, {v}")
        t.stmt(f"vector.store {zero}, {s.lm}[{', '.join(s.lm_at + [t.idx(1), col])}] : {s.lm_t}, {v}")

    def row(q, _):
        r = k.ix("addi", s.o_row, q)
        for c in range(0, dv, lt.vw):
            t.stmt(f"vector.store {zero_o}, {s.o}[{r}, {t.idx(c)}] : {s.o_t}, {vo}")
        return []
    k.loop(0, lt.gr, 1, body=row)


def attend(k: KernelText, lt: LaneTiles, s: LaneState, *, d: int, dv: int, kstart: str,
           kend: str, qpos: list[str], tile_setup: Callable[[str], None],
           key_ref: Callable[[str], object], key_elem: Callable[[object, str], str],
           val_vec: Callable[[object, str], str]) -> None:
    """Stream keys [kstart, kend) through the block's state. qpos: per query vector, the i32
    lane vector of query positions (key kp is allowed to lane q when kp <= qpos[q]);
    tile_setup(k0) runs first in each tile; key_ref(j) locates tile key j (an index value <
    KEY_TILE; past kend it must still read finite memory); key_elem(ref, dd) is its f32
    element dd, val_vec(ref, col) the f32 vector<vw> of its value at column col."""
    t, lanes, c = k.t, lt.lanes, KEY_TILE
    v, vi = fvec(lanes), f"vector<{lanes}xi32>"
    zero = t.const("0.0", v)
    kend_v = t(f"vector.broadcast {t(f'arith.index_cast {kend} : index to i32')} : i32 to {vi}")

    def tile(k0, _):
        tile_setup(k0)

        def keys(jb, _):
            js = [k.ix("addi", jb, j) if j else jb for j in range(lt.nk)]
            refs = [key_ref(j) for j in js]

            def dstep(dd, accs):
                qrow = [t(f"vector.load {s.qt}[{dd}, {t.idx(u * lanes)}] : {s.qt_t}, {v}")
                        for u in range(lt.nv)]
                out = []
                for j in range(lt.nk):
                    kb = t(f"vector.broadcast {key_elem(refs[j], dd)} : f32 to {v}")
                    out += [t(f"vector.fma {kb}, {qrow[u]}, {accs[j * lt.nv + u]} : {v}")
                            for u in range(lt.nv)]
                return out
            res = k.loop(0, d, 1, [zero] * (lt.nk * lt.nv), v, dstep)
            for j in range(lt.nk):
                for u in range(lt.nv):
                    t.stmt(f"vector.store {res[j * lt.nv + u]}, {s.st}[{js[j]}, "
                           f"{t.idx(u * lanes)}] : {s.st_t}, {v}")
            return []
        k.loop(0, c, lt.nk, body=keys)
        for u in range(lt.nv):
            col = t.idx(u * lanes)
            lane_softmax(t, lanes=lanes, st=s.st, stt=s.st_t, col=col, key0=k0, kend_v=kend_v,
                         qpos=qpos[u], lm=s.lm, lmt=s.lm_t,
                         lm_idx=lambda i, col=col: ", ".join(s.lm_at + [t.idx(i), col]),
                         mask="causal")
        _pv(k, lt, s, dv, key_ref, val_vec)
        return []
    k.loop(kstart, kend, c, body=tile)


def _pv(k: KernelText, lt: LaneTiles, s: LaneState, dv: int, key_ref, val_vec) -> None:
    """O[q] = alpha[q] O[q] + sum_j P[j][q] V[j], MQ queries x DB value vectors at a time."""
    t, vw = k.t, lt.vw
    v = fvec(vw)

    def qblock(qb, _):
        qs = [k.ix("addi", qb, q) if q else qb for q in range(lt.mq)]
        rows = [k.ix("addi", s.o_row, q) for q in qs]

        def cblock(dc, _):
            cols = [k.ix("addi", dc, u * vw) if u else dc for u in range(lt.db)]
            accs = []
            for q in range(lt.mq):
                a = t(f"memref.load {s.lm}[{', '.join(s.lm_at + [t.idx(2), qs[q]])}] : {s.lm_t}")
                ab = t(f"vector.broadcast {a} : f32 to {v}")
                for u in range(lt.db):
                    o = t(f"vector.load {s.o}[{rows[q]}, {cols[u]}] : {s.o_t}, {v}")
                    accs.append(t(f"arith.mulf {o}, {ab} : {v}"))

            def key(j, accs):
                ref = key_ref(j)
                vv = [val_vec(ref, cols[u]) for u in range(lt.db)]
                out = []
                for q in range(lt.mq):
                    p = t(f"memref.load {s.st}[{j}, {qs[q]}] : {s.st_t}")
                    pb = t(f"vector.broadcast {p} : f32 to {v}")
                    out += [t(f"vector.fma {pb}, {vv[u]}, {accs[q * lt.db + u]} : {v}")
                            for u in range(lt.db)]
                return out
            res = k.loop(0, KEY_TILE, 1, accs, v, key)
            for q in range(lt.mq):
                for u in range(lt.db):
                    t.stmt(f"vector.store {res[q * lt.db + u]}, {s.o}[{rows[q]}, {cols[u]}] : "
                           f"{s.o_t}, {v}")
            return []
        k.loop(0, dv, lt.db * vw, body=cblock)
        return []
    k.loop(0, lt.gr, lt.mq, body=qblock)
