"""CPU lowerings of the attention kernel ops: rope, kv_cache_store, rope_split_store and
flash_attention_ragged (over the paged KV cache), written as MLIR text over memrefs.

flash_attention_ragged: scf.forall over (sequence, KV head) (the pool splits it over the
threads); per block of R query rows it keeps the G = NH/NKV query heads sharing that KV head
together (GR = G*R query vectors, GQA) and streams the allowed key range in tiles of C keys: the
tile's K and V rows are gathered page by page from the cache into contiguous f32 scratch, then
per query vector: scores of 8 keys at a time (8 FMA accumulators over head_dim, summed with a
shuffle tree; any head_dim: narrower lanes and reductions when head_dim % 8 != 0), the mask on
absolute positions, an online softmax (polynomial exp on
vector<8xf32>), and P @ V as broadcast-FMAs into the f32 accumulator row. Decode (one row per
sequence) is the same code with R = 1.

rope / kv_cache_store / rope_split_store are in rope_store.py.
"""
from __future__ import annotations

from mlir import ir

from ...registry import register_lowering
from ..emit import Emitter, tensor_type
from .linalg import inline_mlir

VW = 8          # f32 lanes of one AVX2 register
KEY_TILE = 32   # keys per tile (K and V tiles stay in L1)
ROW_VECS = 16   # target query vectors (rows x grouped heads) per block


class Text:
    """Writes MLIR text with fresh SSA names: `t("arith.addf {a}, {b} : f32")` -> "%vN"."""

    def __init__(self):
        self.lines: list[str] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}
        self.depth = 2

    def __call__(self, rhs: str, n: int = 1) -> str:
        self._n += 1
        name = f"%v{self._n}"
        self.lines.append("  " * self.depth + (f"{name}:{n} = " if n > 1 else f"{name} = ") + rhs)
        return name

    def stmt(self, s: str) -> None:
        self.lines.append("  " * self.depth + s)

    def idx(self, v: int) -> str:
        key = ("index", v)
        if key not in self._consts:
            self._consts[key] = f"%ci{v}".replace("-", "m")
        return self._consts[key]

    def const(self, v, ty: str) -> str:
        key = (ty, v)
        if key not in self._consts:
            self._consts[key] = f"%k{len(self._consts)}"
        return self._consts[key]

    def prologue(self) -> list[str]:
        out = []
        for (ty, v), name in self._consts.items():
            if ty == "index":
                out.append(f"    {name} = arith.constant {v} : index")
            elif ty.startswith("vector"):
                out.append(f"    {name} = arith.constant dense<{v}> : {ty}")
            else:
                out.append(f"    {name} = arith.constant {v} : {ty}")
        return out

    def open(self, head: str) -> None:
        self.stmt(head + " {")
        self.depth += 1

    def close(self, tail: str = "}") -> None:
        self.depth -= 1
        self.stmt(tail)

    def for_(self, iv: str, lo: str, hi: str, step: str) -> None:
        self.open(f"scf.for {iv} = {lo} to {hi} step {step}")

    def min(self, a: str, b: str) -> str:
        return self(f"arith.minsi {a}, {b} : index")

    def load_index(self, mem: str, idxs: list[str], mem_t: str) -> str:
        """An index from a u32 metadata memref."""
        v = self(f"memref.load {mem}[{', '.join(idxs)}] : {mem_t}")
        return self(f"arith.index_castui {v} : i32 to index")


def fvec(n: int = VW) -> str:
    return f"vector<{n}xf32>"


def vexp(t: Text, x: str) -> str:
    """exp of a vector<8xf32> (Cephes expf: 2^n * poly(r), ~1 ulp); inputs clamped to +-88."""
    v = fvec()
    x = t(f"arith.minimumf {x}, {t.const('88.3762626647949', v)} : {v}")
    x = t(f"arith.maximumf {x}, {t.const('-88.3762626647949', v)} : {v}")
    fx = t(f"math.fma {x}, {t.const('1.44269504088896341', v)}, {t.const('0.5', v)} : {v}")
    fx = t(f"math.floor {fx} : {v}")
    x = t(f"math.fma {fx}, {t.const('-0.693359375', v)}, {x} : {v}")
    x = t(f"math.fma {fx}, {t.const('2.12194440e-4', v)}, {x} : {v}")
    z = t(f"arith.mulf {x}, {x} : {v}")
    y = t.const("1.9875691500E-4", v)
    for c in ("1.3981999507E-3", "8.3334519073E-3", "4.1665795894E-2", "1.6666665459E-1",
              "5.0000001201E-1"):
        y = t(f"math.fma {y}, {x}, {t.const(c, v)} : {v}")
    y = t(f"math.fma {y}, {z}, {x} : {v}")
    y = t(f"arith.addf {y}, {t.const('1.0', v)} : {v}")
    n = t(f"arith.fptosi {fx} : {v} to vector<{VW}xi32>")
    n = t(f"arith.addi {n}, {t.const('127', f'vector<{VW}xi32>')} : vector<{VW}xi32>")
    n = t(f"arith.shli {n}, {t.const('23', f'vector<{VW}xi32>')} : vector<{VW}xi32>")
    p2 = t(f"arith.bitcast {n} : vector<{VW}xi32> to {v}")
    return t(f"arith.mulf {y}, {p2} : {v}")


def hsum8(t: Text, accs: list[str]) -> str:
    """[sum(accs[0]), ..., sum(accs[7])] as one vector<8xf32> (a shuffle/add tree)."""
    v = fvec()

    def hadd(a, b):
        e = t(f"vector.shuffle {a}, {b} [0, 2, 8, 10, 4, 6, 12, 14] : {v}, {v}")
        o = t(f"vector.shuffle {a}, {b} [1, 3, 9, 11, 5, 7, 13, 15] : {v}, {v}")
        return t(f"arith.addf {e}, {o} : {v}")

    lo = hadd(hadd(accs[0], accs[1]), hadd(accs[2], accs[3]))
    hi = hadd(hadd(accs[4], accs[5]), hadd(accs[6], accs[7]))
    a = t(f"vector.shuffle {lo}, {hi} [0, 1, 2, 3, 8, 9, 10, 11] : {v}, {v}")
    b = t(f"vector.shuffle {lo}, {hi} [4, 5, 6, 7, 12, 13, 14, 15] : {v}, {v}")
    return t(f"arith.addf {a}, {b} : {v}")


def load_f32(t: Text, mem: str, idxs: list[str], mem_t: str, el: str, n: int = VW) -> str:
    """vector<n x f32> from a memref of element el (widened when narrower)."""
    v = t(f"vector.load {mem}[{', '.join(idxs)}] : {mem_t}, vector<{n}x{el}>")
    return v if el == "f32" else t(f"arith.extf {v} : vector<{n}x{el}> to {fvec(n)}")


def store_from_f32(t: Text, val: str, mem: str, idxs: list[str], mem_t: str, el: str,
                   n: int = VW) -> None:
    if el != "f32":
        val = t(f"arith.truncf {val} : {fvec(n)} to vector<{n}x{el}>")
    t.stmt(f"vector.store {val}, {mem}[{', '.join(idxs)}] : {mem_t}, vector<{n}x{el}>")


def finish(t: Text, sig: list[str], ret: str | None = None, ret_t: str | None = None) -> str:
    """The module text of `@body(sig) -> ret_t` (no result when ret is None)."""
    body = "\n".join(t.prologue() + t.lines)
    if ret is None:
        return f"module {{\n  func.func @body({', '.join(sig)}) {{\n{body}\n    return\n  }}\n}}"
    return (f"module {{\n  func.func @body({', '.join(sig)}) -> {ret_t} {{\n{body}\n"
            f"    return {ret} : {ret_t}\n  }}\n}}")


def cache_dims(blocks: ir.Value, op: str) -> tuple[int, int, int]:
    """(page_size, n_kv_heads, head_dim) of the paged cache; the kernels need them static."""
    shape = ir.ShapedType(blocks.type).shape
    if any(ir.ShapedType.is_dynamic_size(x) for x in shape[2:]):
        raise NotImplementedError(f"gir.{op} on the CPU needs static [layers, page_size, "
                                  f"n_kv_heads, head_dim] in the cache blocks, got {blocks.type}")
    return shape[3], shape[4], shape[5]


def memref_of(tensor_t: ir.Type) -> str:
    return str(tensor_t).replace("tensor<", "memref<", 1)


def alloc_like(t: Text, src_mem: str, src_t: str, out_t: str) -> str:
    """memref.alloc of out_t with src's dynamic dims (same rank)."""
    shape = ir.ShapedType(ir.Type.parse(out_t)).shape
    dyn = [t(f"memref.dim {src_mem}, {t.idx(i)} : {src_t}")
           for i, d in enumerate(shape) if ir.ShapedType.is_dynamic_size(d)]
    return t(f"memref.alloc({', '.join(dyn)}) : {out_t}")


def to_buffer(t: Text, name: str, ty: ir.Type) -> tuple[str, str]:
    mt = memref_of(ty)
    return t(f"bufferization.to_buffer {name} read_only : {ty} to {mt}"), mt


def sequence_of_row(t: Text, row: str, offs: str, offs_t: str, batch: str) -> str:
    """Index of the sequence owning packed row `row`: #{b >= 1 : offs[b] <= row}."""
    res = t(f"scf.for %sb = {t.idx(1)} to {batch} step {t.idx(1)} iter_args(%sacc = {t.idx(0)})"
            f" -> (index) {{")
    t.depth += 1
    o = t.load_index(offs, ["%sb"], offs_t)
    le = t(f"arith.cmpi ule, {o}, {row} : index")
    inc = t(f"arith.addi %sacc, {t.idx(1)} : index")
    nxt = t(f"arith.select {le}, {inc}, %sacc : index")
    t.stmt(f"scf.yield {nxt} : index")
    t.depth -= 1
    t.stmt("}")
    return res


# -- flash_attention_ragged ------------------------------------------------------------------------
def _mask_vec(t: Text, mask: str, qp: str, kp: str, window: int | None) -> str | None:
    """vector<8xi1> of allowed (query, key) positions (i32 vectors), None when all allowed."""
    vi = f"vector<{VW}xi32>"
    if mask == "null":
        return None
    causal = t(f"arith.cmpi sle, {kp}, {qp} : {vi}")
    if mask == "causal":
        return causal
    w = t.const(str(window), vi)
    if mask == "chunked_causal":
        same = t(f"arith.cmpi eq, {t(f'arith.divui {kp}, {w} : {vi}')}, "
                 f"{t(f'arith.divui {qp}, {w} : {vi}')} : {vi}")
        return t(f"arith.andi {causal}, {same} : vector<{VW}xi1>")
    near = t(f"arith.cmpi slt, {t(f'arith.subi {qp}, {kp} : {vi}')}, {w} : {vi}")
    if mask == "sliding_window_noncausal":
        return near
    return t(f"arith.andi {causal}, {near} : vector<{VW}xi1>")


def flash_attention_text(args, out_t: ir.Type, *, n_heads: int, n_kv_heads: int, head_dim: int,
                         layer: int, mask: str, window: int | None, scale: float) -> str:
    q, blocks, offs, clen, lut = args
    d, g = head_dim, n_heads // n_kv_heads
    dw = next(w for w in (VW, 4, 2, 1) if d % w == 0)   # lanes along head_dim
    r_blk = max(1, ROW_VECS // g)
    gr, c, nv = g * r_blk, KEY_TILE, d // dw
    cv = max(x for x in range(1, min(8, nv) + 1) if nv % x == 0)
    el = str(ir.ShapedType(q.type).element_type)
    bt = str(blocks.type)
    page = cache_dims(blocks, "flash_attention_ragged")[0]
    t = Text()
    v, vi, vd = fvec(), f"vector<{VW}xi32>", fvec(dw)
    qm, qmt = to_buffer(t, "%q", q.type)
    offm, offt = to_buffer(t, "%offs", offs.type)
    clm, clt = to_buffer(t, "%clen", clen.type)
    lutm, lutt = to_buffer(t, "%lut", lut.type)
    omt = memref_of(out_t)
    om = alloc_like(t, qm, qmt, omt)
    nb = t(f"memref.dim {clm}, {t.idx(0)} : {clt}")
    t.open(f"scf.forall (%b, %h) in ({nb}, {n_kv_heads})")
    o0 = t.load_index(offm, ["%b"], offt)
    o1 = t.load_index(offm, [t("arith.addi %b, " + t.idx(1) + " : index")], offt)
    n = t(f"arith.subi {o1}, {o0} : index")
    cl = t.load_index(clm, ["%b"], clt)
    total = t(f"arith.addi {cl}, {n} : index")
    qs = t(f"memref.alloca() : memref<{gr}x{d}xf32>")
    os_ = t(f"memref.alloca() : memref<{gr}x{d}xf32>")
    ms = t(f"memref.alloca() : memref<{gr}xf32>")
    ls = t(f"memref.alloca() : memref<{gr}xf32>")
    pgs = t(f"memref.alloca() : memref<{c}xindex>")
    sls = t(f"memref.alloca() : memref<{c}xindex>")
    pv = t(f"memref.alloca() : memref<{c}xf32>")
    sct, mt1, it = f"memref<{gr}x{d}xf32>", f"memref<{gr}xf32>", f"memref<{c}xindex>"
    t.for_("%r0", t.idx(0), n, t.idx(r_blk))
    rows = t.min(t.idx(r_blk), t(f"arith.subi {n}, %r0 : index"))
    nvec = t(f"arith.muli {rows}, {t.idx(g)} : index")   # query vectors i = r * G + g
    # Q block, pre-scaled, f32.
    t.for_("%i", t.idx(0), nvec, t.idx(1))
    r = t(f"arith.divui %i, {t.idx(g)} : index")
    gg = t(f"arith.remui %i, {t.idx(g)} : index")
    row = t(f"arith.addi {t(f'arith.addi {o0}, %r0 : index')}, {r} : index")
    head = t(f"arith.addi {t(f'arith.muli %h, {t.idx(g)} : index')}, {gg} : index")
    col0 = t(f"arith.muli {head}, {t.idx(d)} : index")
    sc = t.const(f"{float(scale):.17e}", vd)
    zero_v, zero_d = t.const("0.0", v), t.const("0.0", vd)
    for k in range(nv):
        col = t(f"arith.addi {col0}, {t.idx(k * dw)} : index")
        x = load_f32(t, qm, [row, col], qmt, el, dw)
        t.stmt(f"vector.store {t(f'arith.mulf {x}, {sc} : {vd}')}, {qs}[%i, {t.idx(k * dw)}] : {sct}, {vd}")
        t.stmt(f"vector.store {zero_d}, {os_}[%i, {t.idx(k * dw)}] : {sct}, {vd}")
    t.stmt(f"memref.store {t.const('0xFF800000', 'f32')}, {ms}[%i] : {mt1}")
    t.stmt(f"memref.store {t.const('0.0', 'f32')}, {ls}[%i] : {mt1}")
    t.close()
    # The key range of the block (union over its rows; the mask makes it exact per row).
    qlo = t(f"arith.addi {cl}, %r0 : index")
    qhi = t(f"arith.addi {qlo}, {rows} : index")
    kend = total if mask in ("null", "sliding_window_noncausal") else qhi
    kstart = t.idx(0)
    if mask in ("sliding_window_causal", "sliding_window_noncausal"):
        lo = t(f"arith.subi {t(f'arith.addi {qlo}, {t.idx(1)} : index')}, {t.idx(window)} : index")
        kstart = t(f"arith.maxsi {lo}, {t.idx(0)} : index")
    elif mask == "chunked_causal":
        kstart = t(f"arith.muli {t(f'arith.divui {qlo}, {t.idx(window)} : index')}, {t.idx(window)} : index")
    kend_v = t(f"vector.broadcast {t(f'arith.index_cast {kend} : index to i32')} : i32 to {vi}")
    iota = t.const("[" + ", ".join(str(i) for i in range(VW)) + "]", vi)
    t.for_("%k0", kstart, kend, t.idx(c))
    kcnt = t.min(t.idx(c), t(f"arith.subi {kend}, %k0 : index"))
    # Page and slot of each key of the tile (past the range: repeat the last key). K and V rows
    # are read in place from the cache: a tile (C x D x 2) stays in L1 for the block's queries.
    t.for_("%j", t.idx(0), t.idx(c), t.idx(1))
    jj = t.min("%j", t(f"arith.subi {kcnt}, {t.idx(1)} : index"))
    kp = t(f"arith.addi %k0, {jj} : index")
    pg = t.load_index(lutm, ["%b", t(f"arith.divui {kp}, {t.idx(page)} : index")], lutt)
    t.stmt(f"memref.store {pg}, {pgs}[%j] : {it}")
    t.stmt(f"memref.store {t(f'arith.remui {kp}, {t.idx(page)} : index')}, {sls}[%j] : {it}")
    t.close()

    def key_row(j: int, kind: int, col: str) -> list[str]:
        pgj = t(f"memref.load {pgs}[{t.idx(j)}] : {it}")
        slj = t(f"memref.load {sls}[{t.idx(j)}] : {it}")
        return [pgj, t.idx(kind), t.idx(layer), slj, "%h", col]
    k0v = t(f"vector.broadcast {t('arith.index_cast %k0 : index to i32')} : i32 to {vi}")
    t.for_("%i", t.idx(0), nvec, t.idx(1))
    r = t(f"arith.divui %i, {t.idx(g)} : index")
    qp = t(f"arith.addi {qlo}, {r} : index")
    qpv = t(f"vector.broadcast {t(f'arith.index_cast {qp} : index to i32')} : i32 to {vi}")
    svals, valids = [], []
    for grp in range(c // VW):
        init = ", ".join(f"%a{j} = {zero_d}" for j in range(VW))
        res = t(f"scf.for %dd = {t.idx(0)} to {t.idx(d)} step {t.idx(dw)} iter_args({init}) -> "
                f"({', '.join([vd] * VW)}) {{", n=VW)
        t.depth += 1
        qv = t(f"vector.load {qs}[%i, %dd] : {sct}, {vd}")
        nxt = [t(f"vector.fma {qv}, {load_f32(t, '%blocks', key_row(grp * VW + j, 0, '%dd'), bt, el, dw)}, %a{j} : {vd}")
               for j in range(VW)]
        t.stmt(f"scf.yield {', '.join(nxt)} : {', '.join([vd] * VW)}")
        t.depth -= 1
        t.stmt("}")
        if dw == VW:
            s = hsum8(t, [f"{res}#{j}" for j in range(VW)])
        else:
            sums = [t(f"vector.reduction <add>, {res}#{j} : {vd} into f32") for j in range(VW)]
            s = t(f"vector.from_elements {', '.join(sums)} : {v}")
        kpv = t(f"arith.addi {k0v}, {t(f'arith.addi {iota}, {t.const(str(grp * VW), vi)} : {vi}')} : {vi}")
        ok = t(f"arith.cmpi slt, {kpv}, {kend_v} : {vi}")
        mk = _mask_vec(t, mask, qpv, kpv, window)
        if mk is not None:
            ok = t(f"arith.andi {ok}, {mk} : vector<{VW}xi1>")
        ninf = t.const("0xFF800000", v)
        svals.append(t(f"arith.select {ok}, {s}, {ninf} : vector<{VW}xi1>, {v}"))
        valids.append(ok)
    mx = svals[0]
    for s in svals[1:]:
        mx = t(f"arith.maximumf {mx}, {s} : {v}")
    rowmax = t(f"vector.reduction <maximumf>, {mx} : {v} into f32")
    m_old = t(f"memref.load {ms}[%i] : {mt1}")
    m_new = t(f"arith.maximumf {m_old}, {rowmax} : f32")
    isinf = t(f"arith.cmpf oeq, {m_new}, {t.const('0xFF800000', 'f32')} : f32")
    msafe = t(f"arith.select {isinf}, {t.const('0.0', 'f32')}, {m_new} : f32")
    msv = t(f"vector.broadcast {msafe} : f32 to {v}")
    alpha_v = vexp(t, t(f"arith.subf {t(f'vector.broadcast {m_old} : f32 to {v}')}, {msv} : {v}"))
    alpha = t(f"vector.extract {alpha_v}[0] : f32 from {v}")
    ps = []
    for s, ok in zip(svals, valids):
        p = vexp(t, t(f"arith.subf {s}, {msv} : {v}"))
        ps.append(t(f"arith.select {ok}, {p}, {zero_v} : vector<{VW}xi1>, {v}"))
    psum = ps[0]
    for p in ps[1:]:
        psum = t(f"arith.addf {psum}, {p} : {v}")
    lsum = t(f"vector.reduction <add>, {psum} : {v} into f32")
    l_old = t(f"memref.load {ls}[%i] : {mt1}")
    t.stmt(f"memref.store {t(f'math.fma {l_old}, {alpha}, {lsum} : f32')}, {ls}[%i] : {mt1}")
    t.stmt(f"memref.store {m_new}, {ms}[%i] : {mt1}")
    for k, p in enumerate(ps):
        t.stmt(f"vector.store {p}, {pv}[{t.idx(k * VW)}] : memref<{c}xf32>, {v}")
    alpha_d = t(f"vector.broadcast {alpha} : f32 to {vd}")
    t.for_("%dc", t.idx(0), t.idx(d), t.idx(cv * dw))
    accs = []
    for u in range(cv):
        dcol = t(f"arith.addi %dc, {t.idx(u * dw)} : index")
        accs.append((dcol, t(f"arith.mulf {t(f'vector.load {os_}[%i, {dcol}] : {sct}, {vd}')}, {alpha_d} : {vd}")))
    for j in range(c):
        pj = t(f"vector.broadcast {t(f'memref.load {pv}[{t.idx(j)}] : memref<{c}xf32>')} : f32 to {vd}")
        accs = [(dcol, t(f"vector.fma {pj}, {load_f32(t, '%blocks', key_row(j, 1, dcol), bt, el, dw)}, {a} : {vd}"))
                for dcol, a in accs]
    for dcol, a in accs:
        t.stmt(f"vector.store {a}, {os_}[%i, {dcol}] : {sct}, {vd}")
    t.close()   # %dc
    t.close()   # %i
    t.close()   # %k0
    # Normalize and write the block's rows.
    t.for_("%i", t.idx(0), nvec, t.idx(1))
    r = t(f"arith.divui %i, {t.idx(g)} : index")
    gg = t(f"arith.remui %i, {t.idx(g)} : index")
    lval = t(f"memref.load {ls}[%i] : {mt1}")
    pos = t(f"arith.cmpf ogt, {lval}, {t.const('0.0', 'f32')} : f32")
    one, zero = t.const("1.0", "f32"), t.const("0.0", "f32")
    rcp = t(f"arith.divf {one}, {lval} : f32")
    inv = t(f"arith.select {pos}, {rcp}, {zero} : f32")
    invv = t(f"vector.broadcast {inv} : f32 to {vd}")
    row = t(f"arith.addi {t(f'arith.addi {o0}, %r0 : index')}, {r} : index")
    head = t(f"arith.addi {t(f'arith.muli %h, {t.idx(g)} : index')}, {gg} : index")
    col0 = t(f"arith.muli {head}, {t.idx(d)} : index")
    for k in range(nv):
        x = t(f"arith.mulf {t(f'vector.load {os_}[%i, {t.idx(k * dw)}] : {sct}, {vd}')}, {invv} : {vd}")
        store_from_f32(t, x, om, [row, t(f"arith.addi {col0}, {t.idx(k * dw)} : index")], omt, el, dw)
    t.close()   # %i
    t.close()   # %r0
    t.close()   # forall
    out = t(f"bufferization.to_tensor {om} restrict writable : {omt} to {out_t}")
    sig = [f"%q: {q.type}", f"%blocks: {bt}", f"%offs: {offs.type}", f"%clen: {clen.type}",
           f"%lut: {lut.type}"]
    return finish(t, sig, out, str(out_t))


@register_lowering("flash_attention_ragged", "cpu")
def _flash_attention(e: Emitter, args):
    a = e.attrs
    text = flash_attention_text(args, tensor_type(e.out_types[0]), n_heads=a["n_heads"],
                                n_kv_heads=a["n_kv_heads"], head_dim=a["head_dim"],
                                layer=a["layer"], mask=a["mask"], window=a.get("window"),
                                scale=float(a["scale"]))
    return inline_mlir(args, text)
