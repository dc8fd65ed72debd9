"""Benchmark: build a ~2,000-op graph, print its IR, parse it back and verify it.

The issue asks building and printing a 2,000-op graph to take well under a second.
Run: `python tools/bench_build_print.py [--ops 2000] [--repeat 5]`; prints the best of N.
"""
from __future__ import annotations

import argparse
import time

from graphir import ops
from graphir import DeviceRef, DType, Graph, TensorType, Weight, parse


def _block(x, i: int, hidden: int, heads: int):
    """One pre-norm attention + gated-MLP block of primitive ops (about 40 ops)."""
    dev, dt = DeviceRef.CPU(), DType.bfloat16
    hd = hidden // heads
    w = lambda name, shape: Weight(f"layers.{i}.{name}", dt, shape, dev)  # noqa: E731
    h = ops.rms_norm(x, w("input_norm.weight", [hidden]), 1e-6)
    qkv = ops.matmul(h, w("qkv.weight", [3 * hidden, hidden]), transpose_b=True)
    q, k, v = ops.split(qkv, [hidden, hidden, hidden], axis=-1)
    q, k, v = (ops.permute(t.reshape(["seq", heads, hd]), [1, 0, 2]) for t in (q, k, v))
    s = ops.matmul(q, k, transpose_b=True) * (1.0 / hd ** 0.5)
    p = ops.softmax(s.cast(DType.float32)).cast(dt)
    o = ops.permute(ops.matmul(p, v), [1, 0, 2]).reshape(["seq", hidden])
    x = x + ops.matmul(o, w("o_proj.weight", [hidden, hidden]), transpose_b=True)
    h = ops.rms_norm(x, w("post_norm.weight", [hidden]), 1e-6)
    g = ops.silu(ops.matmul(h, w("gate.weight", [2 * hidden, hidden]), transpose_b=True))
    u = ops.matmul(h, w("up.weight", [2 * hidden, hidden]), transpose_b=True)
    y = ops.matmul(g * u, w("down.weight", [hidden, 2 * hidden]), transpose_b=True)
    return ops.clamp(x + y, -1e4, 1e4)


def build(n_ops: int = 2000, hidden: int = 64, heads: int = 4) -> Graph:
    """A stack of blocks with at least n_ops nodes."""
    t = TensorType(DType.bfloat16, ["seq", hidden], DeviceRef.CPU())
    with Graph("bench", input_types=[t]) as g:
        x, i = g.inputs[0], 0
        while len(g.nodes) < n_ops:
            x = _block(x, i, hidden, heads)
            i += 1
        g.output(x)
    return g


def _best(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=2000, help="at least this many ops (default 2000)")
    ap.add_argument("--repeat", type=int, default=5, help="best of N runs (default 5)")
    args = ap.parse_args(argv)
    build(50)  # warm up: imports, op registry
    t_build, g = _best(lambda: build(args.ops), args.repeat)
    t_print, text = _best(lambda: str(g), args.repeat)
    t_parse, g2 = _best(lambda: parse(text), args.repeat)
    t_verify, _ = _best(g.verify, args.repeat)
    assert str(g2) == text, "parse(print(g)) does not print identically"
    n = len(g.nodes)
    print(f"graph: {n} ops, {len(text.splitlines())} lines, {len(text) / 1024:.0f} KiB of IR")
    print(f"{'stage':<16}{'total ms':>10}{'us/op':>9}{'x build':>9}")
    rows = [("build", t_build), ("print", t_print), ("parse", t_parse), ("verify", t_verify),
            ("build + print", t_build + t_print)]
    for name, t in rows:
        print(f"{name:<16}{t * 1e3:>10.1f}{t / n * 1e6:>9.1f}{t / t_build:>9.2f}")
    ok = t_build + t_print < 1.0
    print(f"build + print under 1 s: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
