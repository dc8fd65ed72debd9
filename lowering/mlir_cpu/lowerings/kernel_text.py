"""Writing CPU kernels as MLIR text: fresh names, scf.for with iter_args, scf.if, and vector
idioms (a horizontal sum, an n x n transpose in registers) shared by the quantized-matmul and
MLA kernels."""
from __future__ import annotations

from .attention import Text


class KernelText:
    """The MLIR writer of one kernel: fresh names, loops with iter_args, common buffers."""

    def __init__(self, tiles=None, k: int = 0, n: int = 0):
        self.t = Text()
        self.tiles, self.k, self.n = tiles, k, n   # the quantized kernels' tiling and sizes
        self._n = 0

    def fresh(self, p: str) -> str:
        self._n += 1
        return f"%{p}{self._n}"

    def ix(self, op: str, a: str, b) -> str:
        b = self.t.idx(b) if isinstance(b, int) else b
        return self.t(f"arith.{op} {a}, {b} : index")

    def loop(self, lo, hi, step, inits=(), ty="", body=None) -> list[str]:
        """scf.for; body(iv, iter_args) returns the values to yield; ty: the iter_args' type
        (one for all, or a list)."""
        t = self.t
        lo, hi, step = (t.idx(v) if isinstance(v, int) else v for v in (lo, hi, step))
        iv = self.fresh("i")
        args = [self.fresh("a") for _ in inits]
        tys = list(ty) if isinstance(ty, (list, tuple)) else [ty] * len(inits)
        head = f"scf.for {iv} = {lo} to {hi} step {step}"
        res = None
        if inits:
            init = ", ".join(f"{a} = {v}" for a, v in zip(args, inits))
            res = t(f"{head} iter_args({init}) -> ({', '.join(tys)}) {{", n=len(inits))
        else:
            t.stmt(head + " {")
        t.depth += 1
        out = body(iv, args)
        if inits:
            t.stmt(f"scf.yield {', '.join(out)} : {', '.join(tys)}")
        t.depth -= 1
        t.stmt("}")
        if not inits:
            return []
        return [res] if len(inits) == 1 else [f"{res}#{i}" for i in range(len(inits))]

    def if_(self, cond: str, then, other=None) -> None:
        self.t.open(f"scf.if {cond}")
        then()
        if other is not None:
            self.t.close("} else {")
            self.t.depth += 1
            other()
        self.t.close()


def hsum(t: Text, v: str, n: int) -> str:
    """The sum of the n lanes of v (a shuffle tree; n a power of two)."""
    while n > 1:
        h = n // 2
        lo = t(f"vector.shuffle {v}, {v} [{', '.join(map(str, range(h)))}] : "
               f"vector<{n}xf32>, vector<{n}xf32>")
        hi = t(f"vector.shuffle {v}, {v} [{', '.join(map(str, range(h, n)))}] : "
               f"vector<{n}xf32>, vector<{n}xf32>")
        v, n = t(f"arith.addf {lo}, {hi} : vector<{h}xf32>"), h
    return t(f"vector.extract {v}[0] : f32 from vector<1xf32>")


def transpose(t: Text, rows: list[str], n: int) -> list[str]:
    """The n x n matrix given as n row vectors, transposed (n a power of two): at each level h
    the off-diagonal h x h blocks of every 2h x 2h block swap (2-source shuffles)."""
    rows = list(rows)
    vt = f"vector<{n}xf32>"
    h = n // 2
    while h >= 1:
        lo = [j if not j & h else n + j - h for j in range(n)]
        hi = [j + h if not j & h else n + j for j in range(n)]
        for i in range(n):
            if i & h:
                continue
            a, b = rows[i], rows[i + h]
            rows[i] = t(f"vector.shuffle {a}, {b} [{', '.join(map(str, lo))}] : {vt}, {vt}")
            rows[i + h] = t(f"vector.shuffle {a}, {b} [{', '.join(map(str, hi))}] : {vt}, {vt}")
        h //= 2
    return rows
