"""The per-row path of the CPU flash attention (flash_attention.py): decode steps, the tail rows
of a prefill that the full-block path leaves, and every row at head dims it does not take.

Two passes, both scf.forall:
- (sequence, key split): a task takes one run of whole key tiles of a sequence's rows (split
  S ways, S = 16 / rows when the batch has few rows, so a one-sequence decode step keeps every
  thread busy whatever the KV head count) for ALL its KV heads, and leaves each row's
  unnormalised O, running max and sum per split;
- (sequence, query head): merges a row's S partial states and writes it out.

A key tile of C keys goes slot by slot where 8 query vectors make whole KV heads (G = 1, 2, 4,
8 with the head count to match: `slot_major`): for each slot the scores of 8 query vectors at a
time (one K vector load feeds the query vectors of its head; one shuffle tree sums the 8), so
the cache is read in address order (a slot's K rows of every head lie in one run); the softmax
then goes 8 query vectors to a vector, and P V 8 slots at a time (2 with 16 registers) into the
O rows (kept in L1).
Elsewhere it goes head by head: QB query vectors x 8 keys of score accumulators, the softmax a
query vector at a time, PQ x CV of P V in registers, the next tile's rows prefetched.

The head-a-task kernel this replaces (one (sequence, KV head) a task, its G query vectors one
after another through each tile) ran the Llama-shaped decode at 0.50-0.54 ms (context 1024),
2.32-2.99 ms (4096) and 10.7-11.1 ms (16384) on a 2-core Zen 4 against 0.30-0.33, 1.76-2.01 and
7.47-7.79 ms for this one (BENCHMARKS.md, CPU decode attention).
"""
from __future__ import annotations

from .attention import VW, fvec, hsum8, load_f32, mask_vec, softcap_vec, vexp, vmax_keep
from .flash_attention_base import (KEY_TILE, NEG_INF, _Kernel, _key_range, _page_slot,
                                   _prefetch_row, _prefetch_tile, _tile_pages, store_row)

MAX_SPLITS = 16   # key splits of a row when the batch has one row (16 / rows for more)
# The slot walk prefetches the K and V rows of the key this many keys ahead. A slot's rows of
# all KV heads are one 4 KB run (8 heads x 128 f32), the next slot's the next run: a stream
# the hardware prefetchers restart at every 4 KB page, so each slot's first lines came at
# full memory latency. 4 keys ahead (16 KB) cut the Llama-shaped decode attention inside the
# Q4_K layer's step 629 -> 481 us at context 1024 and 2014 -> 1806 at 4096 (medians, paired
# in one process on a 2-vCPU Zen 3 EPYC; BENCHMARKS.md, "CPU: the decode attention's slot
# walk prefetches"); 2 keys ahead did less, 8 no more.
PREFETCH_KEYS = 4


def _blocking(g: int, nv: int, regs: int) -> tuple[int, int, int]:
    """(QB, PQ, CV): query vectors a score pass (QB x 8 accumulators, QB Q vectors and a K
    vector in registers), query vectors and head_dim vectors a P V pass (PQ x CV accumulators,
    CV V vectors and a broadcast P)."""
    qb = max(x for x in (4, 2, 1) if g % x == 0 and (x * VW + x + 1 <= regs or x == 1))
    pq = max(x for x in range(1, g + 1) if g % x == 0 and (x + 2 <= regs or x == 1))
    cv = max(x for x in (1, 2, 4, 8) if nv % x == 0 and (pq * x + x + 1 <= regs or x == 1))
    return qb, pq, cv


def split_count(t, total_rows: str) -> str:
    """S = max(1, MAX_SPLITS / rows): a decode step of one sequence spreads its keys over up to
    16 tasks (the pool's threads take them); big batches keep one task a sequence."""
    rows = t(f"arith.maxui {total_rows}, {t.idx(1)} : index")
    per = t(f"arith.divui {t.idx(MAX_SPLITS)}, {rows} : index")
    return t(f"arith.maxui {per}, {t.idx(1)} : index")


def tail_pass(k: _Kernel, nkv: int, r0: str, rows: str, page: int, regs: int, splits: str,
              part: tuple[str, str, str]) -> None:
    """Inside the (sequence %b, split %s) forall: rows [r0, r0 + rows) of the sequence, key
    split %s of each, all KV heads; partial O rows, maxima and sums into part (pm, pl, po:
    [S, T, NH] and [S, T, NH, D])."""
    t, d, g, c, el = k.t, k.d, k.g, KEY_TILE, k.el
    nh = nkv * g
    dw = next(w for w in (VW, 4, 2, 1) if d % w == 0)
    nv = d // dw
    slot = slot_major(g, nkv, dw)
    vi, vd = f"vector<{VW}xi32>", fvec(dw)
    sct, mt1 = f"memref<{nh}x{d}xf32>", f"memref<{nh}xf32>"
    # Every scratch of a task is allocated here, outside its loops (an alloca in a loop body
    # takes stack each iteration): Q, O, running maxima and sums of every query head, and the
    # slot walk's scores / P [C][NH] and O rescale factors, or the head walk's P [G][C].
    qs, os_ = t(f"memref.alloca() : {sct}"), t(f"memref.alloca() : {sct}")
    ms, ls = t(f"memref.alloca() : {mt1}"), t(f"memref.alloca() : {mt1}")
    pst = f"memref<{c}x{nh}xf32>" if slot else f"memref<{g}x{c}xf32>"
    ps = t(f"memref.alloca() : {pst}")
    als = t(f"memref.alloca() : {mt1}") if slot else None
    pm, pl, po = part
    pmt, pot = f"memref<?x?x{nh}xf32>", f"memref<?x?x{nh}x{d}xf32>"
    it = f"memref<{KEY_TILE}xindex>"
    zero_d = t.const("0.0", vd)
    scale = t.const(f"{float(k.scale):.17e}", vd)
    t.for_("%r1", r0, t(f"arith.addi {r0}, {rows} : index"), t.idx(1))
    row = t(f"arith.addi {k.o0}, %r1 : index")
    # Q pre-scaled, O zeroed, running max and sum reset, for every query head.
    t.for_("%qh", t.idx(0), t.idx(nh), t.idx(1))
    col0 = t(f"arith.muli %qh, {t.idx(d)} : index")
    for kk in range(nv):
        x = load_f32(t, k.qm, [row, t(f"arith.addi {col0}, {t.idx(kk * dw)} : index")], k.qmt, el,
                     dw)
        t.stmt(f"vector.store {t(f'arith.mulf {x}, {scale} : {vd}')}, {qs}[%qh, {t.idx(kk * dw)}] : {sct}, {vd}")
        t.stmt(f"vector.store {zero_d}, {os_}[%qh, {t.idx(kk * dw)}] : {sct}, {vd}")
    t.stmt(f"memref.store {t.const(NEG_INF, 'f32')}, {ms}[%qh] : {mt1}")
    t.stmt(f"memref.store {t.const('0.0', 'f32')}, {ls}[%qh] : {mt1}")
    t.close()
    qlo, kstart, kend = _key_range(k, "%r1", t.idx(1))
    # This split's run of whole tiles of [kstart, kend) (empty past the last).
    kmax = t(f"arith.maxui {kend}, {kstart} : index")
    span = t(f"arith.subi {kmax}, {kstart} : index")
    ntiles = t(f"arith.ceildivui {span}, {t.idx(c)} : index")
    per = t(f"arith.muli {t(f'arith.ceildivui {ntiles}, {splits} : index')}, {t.idx(c)} : index")
    lo = t(f"arith.addi {kstart}, {t(f'arith.muli %s, {per} : index')} : index")
    lo_per = t(f"arith.addi {lo}, {per} : index")
    hi = t(f"arith.minui {lo_per}, {kend} : index")
    hi_v = t(f"vector.broadcast {t(f'arith.index_cast {hi} : index to i32')} : i32 to {vi}")
    qpv = t(f"vector.broadcast {t(f'arith.index_cast {qlo} : index to i32')} : i32 to {vi}")
    iota = t.const("[" + ", ".join(str(i) for i in range(VW)) + "]", vi)
    t.for_("%k0", lo, hi, t.idx(c))
    _tile_pages(k, "%k0", hi, page, "%j")
    # The head walk names a tile's slots by constants (their pages and rows loaded here, once
    # a tile); the slot walk by loop indices (loaded in its loops).
    pg = [] if slot else [t(f"memref.load {k.pgs}[{t.idx(j)}] : {it}") for j in range(c)]
    sl = [] if slot else [t(f"memref.load {k.sls}[{t.idx(j)}] : {it}") for j in range(c)]

    def kv_row(j, kind: int, head: str, col: str) -> list[str]:
        """Index of key j's K (kind 0) or V (1) row of KV head `head` at column col (j a
        constant, or an index value of a loop over the tile's slots)."""
        if isinstance(j, int):
            p, sj = pg[j], sl[j]
        else:
            p, sj = (t(f"memref.load {m}[{j}] : {it}") for m in (k.pgs, k.sls))
        return [p, t.idx(kind), t.idx(k.layer), sj, head, col]
    k0v = t(f"vector.broadcast {t('arith.index_cast %k0 : index to i32')} : i32 to {vi}")
    valids = []
    for grp in range(c // VW):
        kpv = t(f"arith.addi {k0v}, {t(f'arith.addi {iota}, {t.const(str(grp * VW), vi)} : {vi}')} : {vi}")
        ok = t(f"arith.cmpi slt, {kpv}, {hi_v} : {vi}")
        mk = mask_vec(t, k.mask, qpv, kpv, k.window)
        valids.append(ok if mk is None else t(f"arith.andi {ok}, {mk} : vector<{VW}xi1>"))
    if slot:
        last = t(f"arith.subi {hi}, {t.idx(1)} : index")

        def ahead(j: str, kind: int) -> tuple[str, str, str]:
            """(page, kind, slot) of the key PREFETCH_KEYS past the tile's key j (the
            split's last key past its end; across tiles: indices clamped like the loads')."""
            jp = t(f"arith.addi {j}, {t.idx(PREFETCH_KEYS)} : index")
            kp = t(f"arith.addi %k0, {jp} : index")
            pg, sl = _page_slot(k, t.min(kp, last), page)
            return pg, t.idx(kind), sl
        _slot_tile(k, nkv, kv_row, valids, qs, os_, ms, ls, ps, als, sct, pst, mt1, dw, regs,
                   ahead)
    else:
        _head_tile(k, nkv, kv_row, valids, qs, os_, ms, ls, ps, sct, mt1, pst, dw,
                   *_blocking(g, nv, regs), hi, page)
    t.close()   # %k0
    # The split's partial state of every query head of the row.
    t.for_("%qh", t.idx(0), t.idx(nh), t.idx(1))
    t.stmt(f"memref.store {t(f'memref.load {ms}[%qh] : {mt1}')}, {pm}[%s, {row}, %qh] : {pmt}")
    t.stmt(f"memref.store {t(f'memref.load {ls}[%qh] : {mt1}')}, {pl}[%s, {row}, %qh] : {pmt}")
    for kk in range(nv):
        x = t(f"vector.load {os_}[%qh, {t.idx(kk * dw)}] : {sct}, {vd}")
        t.stmt(f"vector.store {x}, {po}[%s, {row}, %qh, {t.idx(kk * dw)}] : {pot}, {vd}")
    t.close()
    t.close()   # %r1


def _head_tile(k: _Kernel, nkv: int, kv_row, valids: list, qs, os_, ms, ls, pv,
               sct: str, mt1: str, pvt: str, dw: int, qb: int, pq: int, cv: int, hi: str,
               page: int) -> None:
    """One key tile, head by head (the fallback where slot_major does not apply): per head,
    the next tile's rows prefetched, QB query vectors x 8 keys of score accumulators, the
    softmax, PQ x CV of P V."""
    t, d, g, c, el = k.t, k.d, k.g, KEY_TILE, k.el
    v, vd = fvec(), fvec(dw)
    zero_d = t.const("0.0", vd)

    def krow(j: int, kind: int, col: str) -> list[str]:
        return kv_row(j, kind, "%h", col)
    t.for_("%h", t.idx(0), t.idx(nkv), t.idx(1))
    _prefetch_tile(k, t(f"arith.addi %k0, {t.idx(c)} : index"), hi, page)
    qh0 = t(f"arith.muli %h, {t.idx(g)} : index")
    qrow = [t(f"arith.addi {qh0}, {t.idx(q)} : index") for q in range(g)]
    svals = [[] for _ in range(g)]
    for grp in range(c // VW):
        for q0 in range(0, g, qb):
            n = qb * VW
            init = ", ".join(f"%a{j} = {zero_d}" for j in range(n))
            res = t(f"scf.for %dd = {t.idx(0)} to {t.idx(d)} step {t.idx(dw)} iter_args({init}) "
                    f"-> ({', '.join([vd] * n)}) {{", n=n)
            t.depth += 1
            qv = [t(f"vector.load {qs}[{qrow[q0 + q]}, %dd] : {sct}, {vd}") for q in range(qb)]
            kv = [load_f32(t, "%blocks", krow(grp * VW + j, 0, "%dd"), k.bt, el, dw)
                  for j in range(VW)]
            nxt = [t(f"vector.fma {qv[q]}, {kv[j]}, %a{q * VW + j} : {vd}")
                   for q in range(qb) for j in range(VW)]
            t.stmt(f"scf.yield {', '.join(nxt)} : {', '.join([vd] * n)}")
            t.depth -= 1
            t.stmt("}")
            for q in range(qb):
                accs = [f"{res}#{q * VW + j}" for j in range(VW)]
                if dw == VW:
                    s = hsum8(t, accs)
                else:
                    sums = [t(f"vector.reduction <add>, {a} : {vd} into f32") for a in accs]
                    s = t(f"vector.from_elements {', '.join(sums)} : {v}")
                s = softcap_vec(t, s, k.softcap)
                svals[q0 + q].append(t(f"arith.select {valids[grp]}, {s}, "
                                       f"{t.const(NEG_INF, v)} : vector<{VW}xi1>, {v}"))
    alphas = [_softmax(t, svals[q], valids, qrow[q], q, ms, ls, pv, mt1, pvt) for q in range(g)]
    for q0 in range(0, g, pq):
        t.for_("%dc", t.idx(0), t.idx(d), t.idx(cv * dw))
        accs = {}
        for q in range(pq):
            al = t(f"vector.broadcast {alphas[q0 + q]} : f32 to {vd}")
            for u in range(cv):
                dcol = t(f"arith.addi %dc, {t.idx(u * dw)} : index")
                accs[q, u] = t(f"arith.mulf {t(f'vector.load {os_}[{qrow[q0 + q]}, {dcol}] : {sct}, {vd}')}, {al} : {vd}")
        for j in range(c):
            vv = [load_f32(t, "%blocks", krow(j, 1, t(f"arith.addi %dc, {t.idx(u * dw)} : index")),
                           k.bt, el, dw) for u in range(cv)]
            for q in range(pq):
                pj = t(f"vector.broadcast {t(f'memref.load {pv}[{t.idx(q0 + q)}, {t.idx(j)}] : {pvt}')} : f32 to {vd}")
                for u in range(cv):
                    accs[q, u] = t(f"vector.fma {pj}, {vv[u]}, {accs[q, u]} : {vd}")
        for (q, u), a in accs.items():
            t.stmt(f"vector.store {a}, {os_}[{qrow[q0 + q]}, {t(f'arith.addi %dc, {t.idx(u * dw)} : index')}] : {sct}, {vd}")
        t.close()   # %dc
    t.close()   # %h


def slot_major(g: int, nkv: int, dw: int) -> bool:
    """Whether the tile goes slot by slot: 8 query vectors (8 / G KV heads) a score pass, one
    shuffle tree summing them; or 8 of a head's G when G is a multiple of 8 (MQA-like groups)."""
    return dw == VW and (VW % g == 0 and nkv % (VW // g) == 0 or g % VW == 0)


def _slot_tile(k: _Kernel, nkv: int, kv_row, valids: list, qs, os_, ms, ls, st,
               als, sct: str, stt: str, mt1: str, dw: int, regs: int, ahead) -> None:
    """One key tile slot by slot, every KV head of a slot in turn, so K and V are read in
    address order. Scores of 8 query vectors (HP = 8 / G heads, or G / 8 passes over one
    head) at a time into a [C][NH] scratch, the softmax 8 query vectors to a vector, then P V
    NS slots at a time into the O rows (in L1). ahead(j, kind): (page, kind, slot) of the key
    PREFETCH_KEYS past the tile's key j, whose K rows the score pass and V rows the P V pass
    prefetch."""
    t, g, c = k.t, k.g, KEY_TILE
    hp = max(1, VW // g)
    t.for_("%js", t.idx(0), t.idx(c), t.idx(1))
    page, _, layer, slot, _, _ = kv_row("%js", 0, "", "")  # the slot's page and row, once

    def slot_row(kind: int, head: str, col: str) -> list[str]:
        return [page, t.idx(kind), layer, slot, head, col]
    next_k = ahead("%js", 0)
    t.for_("%hs", t.idx(0), t.idx(nkv), t.idx(hp))
    heads = [t(f"arith.addi %hs, {t.idx(u)} : index") for u in range(hp)]
    for h in heads:
        _prefetch_row(k, next_k, h, 3)
    for qc in range(max(1, g // VW)):
        _slot_scores(k, "%js", heads, qc, qs, st, sct, stt, slot_row, dw)
    t.close()   # %hs
    t.close()   # %js
    # P V 8 slots at a time with 32 vector registers (their P values stay live across the
    # head_dim loop): 1.76-2.65 ms against 2.32-3.29 for 2 at a time, context 4096, on a
    # 2-core Zen 4 (BENCHMARKS.md, CPU decode attention); 2 with 16 registers.
    ns = 8 if regs >= 32 else 2
    _slot_softmax_pv(k, nkv, valids, os_, ms, ls, st, als, sct, stt, mt1, dw, kv_row, ns, ahead)


def _slot_scores(k: _Kernel, j: str, heads: list[str], qc: int, qs: str, st: str, sct: str,
                 stt: str, slot_row, dw: int) -> None:
    """Scores of slot j against 8 query vectors, those of heads (G < 8) or the qc-th 8 of
    heads[0] (G a multiple of 8): one K vector load a head, one shuffle tree, into row j.
    slot_row(kind, head, col): the index of slot j's K (0) or V (1) row."""
    t, d, g, el = k.t, k.d, k.g, k.el
    v, vd = fvec(), fvec(dw)
    zero_d = t.const("0.0", vd)
    q0 = t(f"arith.addi {t(f'arith.muli %hs, {t.idx(g)} : index')}, {t.idx(qc * VW)} : index")
    qrows = [t(f"arith.addi {q0}, {t.idx(i)} : index") for i in range(VW)]
    init = ", ".join(f"%a{i} = {zero_d}" for i in range(VW))
    res = t(f"scf.for %dd = {t.idx(0)} to {t.idx(d)} step {t.idx(dw)} iter_args({init}) "
            f"-> ({', '.join([vd] * VW)}) {{", n=VW)
    t.depth += 1
    kv = [load_f32(t, "%blocks", slot_row(0, h, "%dd"), k.bt, el, dw) for h in heads]
    nxt = []
    for i in range(VW):
        qv = t(f"vector.load {qs}[{qrows[i]}, %dd] : {sct}, {vd}")
        nxt.append(t(f"vector.fma {qv}, {kv[i // g]}, %a{i} : {vd}"))
    t.stmt(f"scf.yield {', '.join(nxt)} : {', '.join([vd] * VW)}")
    t.depth -= 1
    t.stmt("}")
    sv = softcap_vec(t, hsum8(t, [f"{res}#{i}" for i in range(VW)]), k.softcap)
    t.stmt(f"vector.store {sv}, {st}[{j}, {q0}] : {stt}, {v}")


def _slot_softmax_pv(k: _Kernel, nkv: int, valids: list, os_: str, ms: str, ls: str, st: str,
                     als: str, sct: str, stt: str, mt1: str, dw: int, kv_row, ns: int,
                     ahead) -> None:
    """The tile's online-softmax step 8 query vectors to a vector (a key's mask is the same
    for all of them; the scores in the scratch become P), the O rows rescaled, then P V NS
    slots at a time, every head of them in turn (a V vector load feeds the head's G rows; an
    O row's load and store serve NS FMAs)."""
    t, d, g, c, el = k.t, k.d, k.g, KEY_TILE, k.el
    nh, nv = nkv * g, d // dw
    v, vd = fvec(), fvec(dw)
    ninf_v = t.const(NEG_INF, v)
    okj = []
    for j in range(c):
        e = t(f"vector.extract {valids[j // VW]}[{j % VW}] : i1 from vector<{VW}xi1>")
        okj.append(t(f"vector.broadcast {e} : i1 to vector<{VW}xi1>"))
    # Loops, not unrolled Python loops, over the query-vector groups here and the head_dim
    # vectors of P V below: unrolled, the layer's attention kernel was 12,700 lines of MLIR
    # and its cold compile 10-12 s instead of 2.5 s (2-core EPYC).
    t.for_("%i0", t.idx(0), t.idx(nh), t.idx(VW))
    qi = "%i0"
    m_old = t(f"vector.load {ms}[{qi}] : {mt1}, {v}")
    svals = []
    mx = m_old
    for j in range(c):
        sj = t(f"vector.load {st}[{t.idx(j)}, {qi}] : {stt}, {v}")
        sj = t(f"arith.select {okj[j]}, {sj}, {ninf_v} : vector<{VW}xi1>, {v}")
        svals.append(sj)
        mx = vmax_keep(t, mx, sj)
    msafe, lsum = _probs(t, svals, okj, mx, lambda j, p: t.stmt(
        f"vector.store {p}, {st}[{t.idx(j)}, {qi}] : {stt}, {v}"))
    alpha = vexp(t, t(f"arith.subf {m_old}, {msafe} : {v}"))
    l_old = t(f"vector.load {ls}[{qi}] : {mt1}, {v}")
    lnew = t(f"vector.fma {l_old}, {alpha}, {lsum} : {v}")
    t.stmt(f"vector.store {lnew}, {ls}[{qi}] : {mt1}, {v}")
    t.stmt(f"vector.store {mx}, {ms}[{qi}] : {mt1}, {v}")
    t.stmt(f"vector.store {alpha}, {als}[{qi}] : {mt1}, {v}")
    t.close()   # %i0
    t.for_("%qa", t.idx(0), t.idx(nh), t.idx(1))
    a_s = t(f"memref.load {als}[%qa] : {mt1}")
    av = t(f"vector.broadcast {a_s} : f32 to {vd}")
    for u in range(nv):
        col = t.idx(u * dw)
        o = t(f"vector.load {os_}[%qa, {col}] : {sct}, {vd}")
        t.stmt(f"vector.store {t(f'arith.mulf {o}, {av} : {vd}')}, {os_}[%qa, {col}] : {sct}, {vd}")
    t.close()
    t.for_("%j0", t.idx(0), t.idx(c), t.idx(ns))
    js = [t(f"arith.addi %j0, {t.idx(n)} : index") for n in range(ns)]
    rows = [kv_row(j, 1, "%hv", "%uc") for j in js]  # the slots' V rows (pages loaded here)
    next_v = [ahead(j, 1) for j in js]
    t.for_("%hv", t.idx(0), t.idx(nkv), t.idx(1))
    for nxt in next_v:
        _prefetch_row(k, nxt, "%hv", 3)
    q0 = t(f"arith.muli %hv, {t.idx(g)} : index")
    qrows = [t(f"arith.addi {q0}, {t.idx(q)} : index") for q in range(g)]
    ps = []
    for j in js:
        row = []
        for q in range(g):
            pe = t(f"memref.load {st}[{j}, {qrows[q]}] : {stt}")
            row.append(t(f"vector.broadcast {pe} : f32 to {vd}"))
        ps.append(row)
    t.for_("%uc", t.idx(0), t.idx(d), t.idx(dw))
    vv = [load_f32(t, "%blocks", r, k.bt, el, dw) for r in rows]
    for q in range(g):
        o = t(f"vector.load {os_}[{qrows[q]}, %uc] : {sct}, {vd}")
        for n in range(ns):
            o = t(f"vector.fma {ps[n][q]}, {vv[n]}, {o} : {vd}")
        t.stmt(f"vector.store {o}, {os_}[{qrows[q]}, %uc] : {sct}, {vd}")
    t.close()   # %uc
    t.close()   # %hv
    t.close()   # %j0


def _probs(t, svals: list[str], oks: list[str], mx: str, store) -> tuple[str, str]:
    """(m, sum of p) of an online-softmax step: m the new running max `mx` (8 lanes) with -inf
    read as 0, so a row with no allowed key yet stays at zeros; p = e^(s - m) of each score
    vector where allowed (0 elsewhere), passed to store(i, p)."""
    v = fvec()
    zero = t.const("0.0", v)
    isinf = t(f"arith.cmpf oeq, {mx}, {t.const(NEG_INF, v)} : {v}")
    msafe = t(f"arith.select {isinf}, {zero}, {mx} : vector<{VW}xi1>, {v}")
    psum = None
    for i, (s, ok) in enumerate(zip(svals, oks)):
        p = vexp(t, t(f"arith.subf {s}, {msafe} : {v}"))
        p = t(f"arith.select {ok}, {p}, {zero} : vector<{VW}xi1>, {v}")
        store(i, p)
        psum = p if psum is None else t(f"arith.addf {psum}, {p} : {v}")
    return msafe, psum


def _softmax(t, svals: list[str], valids: list[str], qi: str, q: int, ms: str, ls: str, pv: str,
             mt1: str, pvt: str) -> str:
    """Online softmax of a query vector (row qi of the head scratch, row q of P) over a tile's
    scores: updates its running max and sum, stores its P row, returns its O row's rescale."""
    v = fvec()
    mx = svals[0]
    for s in svals[1:]:
        mx = vmax_keep(t, mx, s)
    rowmax = t(f"vector.reduction <maximumf>, {mx} : {v} into f32")
    m_old = t(f"memref.load {ms}[{qi}] : {mt1}")
    m_new = t(f"arith.maximumf {m_old}, {rowmax} : f32")
    msv, psum = _probs(t, svals, valids, t(f"vector.broadcast {m_new} : f32 to {v}"),
                       lambda grp, p: t.stmt(f"vector.store {p}, {pv}[{t.idx(q)}, "
                                             f"{t.idx(grp * VW)}] : {pvt}, {v}"))
    alpha_v = vexp(t, t(f"arith.subf {t(f'vector.broadcast {m_old} : f32 to {v}')}, {msv} : {v}"))
    alpha = t(f"vector.extract {alpha_v}[0] : f32 from {v}")
    lsum = t(f"vector.reduction <add>, {psum} : {v} into f32")
    l_old = t(f"memref.load {ls}[{qi}] : {mt1}")
    t.stmt(f"memref.store {t(f'math.fma {l_old}, {alpha}, {lsum} : f32')}, {ls}[{qi}] : {mt1}")
    t.stmt(f"memref.store {m_new}, {ms}[{qi}] : {mt1}")
    return alpha


def merge_pass(k: _Kernel, nh: int, r0: str, rows: str, splits: str,
               part: tuple[str, str, str]) -> None:
    """Inside the (sequence %b, query head %qh) forall: rows [r0, r0 + rows) of the sequence
    from the S partial states: O = sum_s e^(m_s - m) O_s / sum_s e^(m_s - m) l_s (store_row)."""
    t, d = k.t, k.d
    dw = next(w for w in (VW, 4, 2, 1) if d % w == 0)
    nv, vd, v = d // dw, fvec(dw), fvec()
    pm, pl, po = part
    pmt, pot = f"memref<?x?x{nh}xf32>", f"memref<?x?x{nh}x{d}xf32>"
    ninf, zero = t.const(NEG_INF, "f32"), t.const("0.0", "f32")
    t.for_("%r1", r0, t(f"arith.addi {r0}, {rows} : index"), t.idx(1))
    row = t(f"arith.addi {k.o0}, %r1 : index")
    mx = t(f"scf.for %ms = {t.idx(0)} to {splits} step {t.idx(1)} iter_args(%mm = {ninf}) -> (f32) {{")
    t.depth += 1
    m_s = t(f"memref.load {pm}[%ms, {row}, %qh] : {pmt}")
    t.stmt(f"scf.yield {t(f'arith.maximumf %mm, {m_s} : f32')} : f32")
    t.depth -= 1
    t.stmt("}")
    msafe = t(f"arith.select {t(f'arith.cmpf oeq, {mx}, {ninf} : f32')}, {zero}, {mx} : f32")
    init = ", ".join([f"%ml = {zero}"] + [f"%mo{u} = {t.const('0.0', vd)}" for u in range(nv)])
    res = t(f"scf.for %ms = {t.idx(0)} to {splits} step {t.idx(1)} iter_args({init}) -> "
            f"({', '.join(['f32'] + [vd] * nv)}) {{", n=nv + 1)
    t.depth += 1
    m_s = t(f"memref.load {pm}[%ms, {row}, %qh] : {pmt}")
    dm = t(f"arith.subf {m_s}, {msafe} : f32")
    w = t(f"vector.extract {vexp(t, t(f'vector.broadcast {dm} : f32 to {v}'))}[0] : f32 from {v}")
    l_s = t(f"memref.load {pl}[%ms, {row}, %qh] : {pmt}")
    lnew = t(f"math.fma {l_s}, {w}, %ml : f32")
    wv = t(f"vector.broadcast {w} : f32 to {vd}")
    onew = []
    for u in range(nv):
        o_s = t(f"vector.load {po}[%ms, {row}, %qh, {t.idx(u * dw)}] : {pot}, {vd}")
        onew.append(t(f"vector.fma {o_s}, {wv}, %mo{u} : {vd}"))
    t.stmt(f"scf.yield {', '.join([lnew] + onew)} : {', '.join(['f32'] + [vd] * nv)}")
    t.depth -= 1
    t.stmt("}")
    store_row(k, [f"{res}#{u + 1}" for u in range(nv)], f"{res}#0", row, "%qh", dw)
    t.close()   # %r1
