"""MLIR text helpers shared by the CPU attention kernels (flash_attention.py, rope_store.py,
mla.py): a writer with fresh SSA names, a vector exp, horizontal sums, widening loads and
narrowing stores, masks on absolute positions, and paged-cache plumbing.
"""
from __future__ import annotations

from mlir import ir

VW = 8          # f32 lanes of the per-query-vector attention path (one AVX2 register)


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

    def fresh(self, prefix: str) -> str:
        """A new name for a value the text defines itself (a loop's induction variable)."""
        self._n += 1
        return f"{prefix}{self._n}"

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

    def clamp(self, i: str, n: str) -> str:
        """i clamped into [0, n) (unsigned: a negative difference clamps high); metadata-derived
        indices go through it so a kernel stays inside its buffers even when the host checks
        were bypassed. Valid metadata is never changed."""
        return self(f"arith.minui {i}, {self(f'arith.subi {n}, {self.idx(1)} : index')} : index")

    def dim(self, mem: str, i: int, mem_t: str) -> str:
        return self(f"memref.dim {mem}, {self.idx(i)} : {mem_t}")

    def load_index(self, mem: str, idxs: list[str], mem_t: str) -> str:
        """An index from a u32 metadata memref."""
        v = self(f"memref.load {mem}[{', '.join(idxs)}] : {mem_t}")
        return self(f"arith.index_castui {v} : i32 to index")


def fvec(n: int = VW) -> str:
    return f"vector<{n}xf32>"


def vmax_keep(t: Text, acc: str, x: str, lanes: int = VW) -> str:
    """x > acc ? x : acc, a running max of vector<lanes x f32>: one vmaxps, where
    arith.maximumf adds a NaN test and a blend. A NaN x is left out of the max; softmax callers
    still carry it to their output through its exp (exp(NaN - max) is NaN)."""
    v = fvec(lanes)
    gt = t(f"arith.cmpf ogt, {x}, {acc} : {v}")
    return t(f"arith.select {gt}, {x}, {acc} : vector<{lanes}xi1>, {v}")


def vexp(t: Text, x: str, lanes: int = VW) -> str:
    """exp of a vector<lanes x f32> (Cephes expf: 2^n * poly(r), ~1 ulp); inputs clamped to
    +-88 (16 lanes: from below to -105, so that exp(-inf) is 0 and the subnormal range is
    kept; narrower vectors flush below e^-88 to 0)."""
    v, b = fvec(lanes), f"vector<{lanes}xi1>"
    # Clamped by compare + select (one vminps / vmaxps each): arith.minimumf / maximumf add a
    # NaN test and a blend. Written so that a NaN x fails the compare and stays NaN.
    hi = t.const("88.3762626647949", v)
    lo = t.const("-105.0" if lanes == 16 else "-88.3762626647949", v)
    x = t(f"arith.select {t(f'arith.cmpf ogt, {x}, {hi} : {v}')}, {hi}, {x} : {b}, {v}")
    x = t(f"arith.select {t(f'arith.cmpf olt, {x}, {lo} : {v}')}, {lo}, {x} : {b}, {v}")
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
    if lanes == 16:
        # Only AVX-512 targets give a kernel 16 f32 lanes: vscalefps multiplies by 2^fx (fx is
        # already an integer) in one instruction, where the integer route below takes five
        # (convert, add the bias, shift, bitcast, multiply).
        ones = t.const("-1", "i16")
        rnd = t.const("4", "i32")   # _MM_FROUND_CUR_DIRECTION
        return t(f"x86vector.avx512.mask.scalef {y}, {fx}, {y}, {ones}, {rnd} : {v}")
    vi = f"vector<{lanes}xi32>"
    n = t(f"arith.fptosi {fx} : {v} to {vi}")
    n = t(f"arith.addi {n}, {t.const('127', vi)} : {vi}")
    n = t(f"arith.shli {n}, {t.const('23', vi)} : {vi}")
    p2 = t(f"arith.bitcast {n} : {vi} to {v}")
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


def sequence_span(t: Text, offs: str, offs_t: str, clen: str, clen_t: str, b: str, rows: str,
                  max_tokens: str) -> tuple[str, str, str]:
    """(first row, new rows, cached tokens) of sequence b, clamped so that its rows lie in
    [0, rows) and its cached tokens are at most max_tokens (all its lookup-table row can
    address): bad offsets or cache lengths can neither move a kernel out of its buffers nor
    start a 2^32-key loop. Valid metadata is unchanged."""
    o0 = t(f"arith.minui {t.load_index(offs, [b], offs_t)}, {rows} : index")
    o1 = t.load_index(offs, [t(f"arith.addi {b}, {t.idx(1)} : index")], offs_t)
    o1 = t(f"arith.minui {t(f'arith.maxui {o1}, {o0} : index')}, {rows} : index")
    cl = t(f"arith.minui {t.load_index(clen, [b], clen_t)}, {max_tokens} : index")
    return o0, t(f"arith.subi {o1}, {o0} : index"), cl


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


def mask_vec(t: Text, mask: str, qp: str, kp: str, window: int | None, n: int = VW) -> str | None:
    """vector<n x i1> of allowed (query, key) positions (i32 vectors), None when all allowed."""
    vi = f"vector<{n}xi32>"
    if mask == "null":
        return None
    causal = t(f"arith.cmpi sle, {kp}, {qp} : {vi}")
    if mask == "causal":
        return causal
    w = t.const(str(window), vi)
    if mask == "chunked_causal":
        same = t(f"arith.cmpi eq, {t(f'arith.divui {kp}, {w} : {vi}')}, "
                 f"{t(f'arith.divui {qp}, {w} : {vi}')} : {vi}")
        return t(f"arith.andi {causal}, {same} : vector<{n}xi1>")
    near = t(f"arith.cmpi slt, {t(f'arith.subi {qp}, {kp} : {vi}')}, {w} : {vi}")
    if mask == "sliding_window_noncausal":
        return near
    return t(f"arith.andi {causal}, {near} : vector<{n}xi1>")


def softcap_vec(t: Text, x: str, cap: float | None, n: int = VW) -> str:
    """cap * tanh(x / cap) of a vector<n x f32> (attention logit soft-capping); x when cap is
    None."""
    if cap is None:
        return x
    v, c = fvec(n), t.const(f"{float(cap):.17e}", fvec(n))
    y = t(f"math.tanh {t(f'arith.divf {x}, {c} : {v}')} : {v}")
    return t(f"arith.mulf {y}, {c} : {v}")
