"""Benchmark: the CPU flash attention of a decode step alone (flash_attention_ragged, one new
token a sequence over a paged float32 cache of one layer), compiled by graphir, checked against
graphir.ops.attention_math first.

Run: .venv/bin/python tools/bench_cpu_decode_attention.py [--heads 32] [--kv-heads 8]
         [--batch 1] [--contexts 1024,4096,16384] [--rounds 6]

Prints best and median wall time of a call per context and the K/V bytes read per second.
To compare two versions of the kernel, run this from each checkout in turn, several times and
alternating, each with its own empty GRAPHIR_CACHE_DIR: the compile cache is keyed by the
compiler's source digest, so one process (or a shared cache) would give both the first build.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D, PAGE = 128, 128


def bench(nh: int, nkv: int, batch: int, ctx: int, rounds: int) -> tuple[float, float, float]:
    """(best s, median s, max relative error) of one decode-step attention call."""
    from graphir import BufferType, DType, Graph, TensorType, ops
    from graphir.ops import attention_math as am
    from graphir.runtime.session import InferenceSession

    rng = np.random.default_rng(0)
    per = ctx // PAGE + 1
    pages = batch * per + 1
    blocks = rng.standard_normal((pages, 2, 1, PAGE, nkv, D)).astype(np.float32)
    lut = rng.permutation(pages - 1)[: batch * per].reshape(batch, per).astype(np.uint32)
    offs = np.arange(batch + 1, dtype=np.uint32)
    clen = np.full(batch, ctx, np.uint32)
    q = rng.standard_normal((batch, nh * D)).astype(np.float32)
    u32 = DType.uint32
    types = [TensorType(DType.float32, ["t", nh * D]),
             BufferType(DType.float32, ["pages", 2, 1, PAGE, nkv, D]), TensorType(u32, ["b + 1"]),
             TensorType(u32, ["b"]), TensorType(u32, ["b", "m"])]
    with Graph("decode_attention", input_types=types) as g:
        x, bl, o, c, lt = g.inputs
        g.output(ops.flash_attention_ragged(x, bl, o, c, lt, n_heads=nh, n_kv_heads=nkv,
                                            head_dim=D, layer_idx=0))
    model = InferenceSession().load(g, weights={})
    args = (q, blocks, offs, clen, lut)
    got = model.execute(*args)[0].reshape(-1)
    want = am.flash_attention_ragged(q.reshape(-1, nh, D), blocks, layer_idx=0,
                                     input_row_offsets=offs, cache_lengths=clen,
                                     lookup_table=lut, mask_variant="causal",
                                     scale=D ** -0.5).reshape(-1)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    times = []
    for _ in range(rounds * 10):
        t = time.perf_counter()
        model.execute(*args)
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    print(f"decode attention: batch {a.batch}, {a.heads}/{a.kv_heads} heads, head dim {D}, "
          f"float32 cache, pages of {PAGE}")
    for ctx in (int(c) for c in a.contexts.split(",")):
        best, med, err = bench(a.heads, a.kv_heads, a.batch, ctx, a.rounds)
        kv = a.batch * 2 * (ctx + 1) * a.kv_heads * D * 4
        if not err < 1e-4:
            raise SystemExit(f"context {ctx}: max relative error {err:.1e} against the reference")
        print(f"context {ctx:6}: best {best * 1e3:7.3f} ms  median {med * 1e3:7.3f} ms  "
              f"{kv / best / 1e9:5.1f} GB/s of K/V  (max rel err {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
