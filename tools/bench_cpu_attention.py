"""Benchmark: the Llama-3-8B attention layer (hidden 4096, 32 heads, 8 KV heads, head dim 128,
f32) compiled for the CPU vs the same layer in torch CPU eager, in one run.

Run: .venv/bin/python tools/bench_cpu_attention.py [--prefill 512] [--batch 8] [--context 1024]

Prints: the CPU target the layer was compiled for (`--target`, default this host's), cold compile
time (empty cache), the time to open the artifact from the cache (lookup, sha256 check of every
file, dlopen; plus, separately, binding the weights: the qkv concat and weight packing done
once at load), then prefill and decode-step times of both (best and median of --reps rounds;
each round times every contender once, so a load from other processes hits them alike; the
load average before and after) and the ratio compiled/torch of the best times (prefill target
<= 0.9), with the max relative difference of their outputs. Last, a roofline chart (PNG,
--roofline) of each case for graphir and both torch layers under this CPU's measured copy
bandwidth and torch f32 GEMM rate.
The torch layer: one fused qkv linear, half-split RoPE from the same table, then either
"paged" (the same computation: new K/V written into a paged cache of the same layout, K/V
gathered from the pages) or "dense" (a stronger baseline: a contiguous per-sequence cache
[batch, n_kv, max_len, head_dim], read without a copy), SDPA (GQA), o_proj. `--compile MODE`
adds torch.compile of the dense layer written as one graph for the step's fixed shapes (no
graph break; `--compile none` leaves it out).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphir.tools.roofline import Point, attention_layer_work, write_chart  # noqa: E402

PAGE = 128


class TorchLayer:
    """The same attention layer in torch eager over the same paged cache layout."""

    def __init__(self, weights: dict, freqs: np.ndarray, n_heads: int, n_kv: int, d: int,
                 dense: tuple | None = None, dtype=None):
        import torch

        self.dense = dense   # (k_cache, v_cache) [batch, n_kv, max_len, d], or None: paged

        self.torch = torch
        dtype = dtype or torch.float32   # bf16: every weight and activation, as model.to() does
        self.wqkv = torch.from_numpy(np.concatenate(
            [weights["q_proj.weight"], weights["k_proj.weight"], weights["v_proj.weight"]])).to(dtype)
        self.wo = torch.from_numpy(weights["o_proj.weight"]).to(dtype)
        f = torch.from_numpy(freqs).to(dtype)
        self.cos, self.sin = f[:, 0::2], f[:, 1::2]
        self.nh, self.nkv, self.d = n_heads, n_kv, d

    def static_step(self, batch: int, n: int, total: int):
        """The dense layer as one traceable function of (x, pos, seq) for `batch` sequences of
        `n` new tokens each over `total` keys: what torch.compile captures whole."""
        torch, nh, nkv, d = self.torch, self.nh, self.nkv, self.d
        kc, vc = self.dense
        causal = n > 1

        def step(x, pos, seq):
            t = x.shape[0]
            q, k, v = torch.nn.functional.linear(x, self.wqkv).split(
                [nh * d, nkv * d, nkv * d], dim=1)
            q, k = self._rope(q.reshape(t, nh, d), pos), self._rope(k.reshape(t, nkv, d), pos)
            kc[seq, :, pos] = k
            vc[seq, :, pos] = v.reshape(t, nkv, d)
            qq = q.reshape(batch, n, nh, d).transpose(1, 2)
            o = torch.nn.functional.scaled_dot_product_attention(
                qq, kc[:, :, :total], vc[:, :, :total], is_causal=causal, enable_gqa=True)
            return torch.nn.functional.linear(o.transpose(1, 2).reshape(t, nh * d), self.wo)
        return step

    def _rope(self, x, pos):
        h = self.d // 2
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        a, b = x[..., :h], x[..., h:]
        return self.torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def __call__(self, x, offs, blocks, clen, lut):
        torch, nh, nkv, d = self.torch, self.nh, self.nkv, self.d
        t = x.shape[0]
        qkv = torch.nn.functional.linear(x, self.wqkv)
        q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=1)
        counts = (offs[1:] - offs[:-1]).tolist()
        seq = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        pos = clen[seq] + torch.arange(t) - offs[:-1][seq]
        q = self._rope(q.reshape(t, nh, d), pos)
        k = self._rope(k.reshape(t, nkv, d), pos)
        if self.dense is None:
            pages, slots = lut[seq, pos // PAGE], pos % PAGE
            blocks[pages, 0, 0, slots] = k
            blocks[pages, 1, 0, slots] = v.reshape(t, nkv, d)
        else:
            self.dense[0][seq, :, pos] = k
            self.dense[1][seq, :, pos] = v.reshape(t, nkv, d)
        totals = (clen + torch.tensor(counts)).tolist()
        outs = []
        if len(set(counts)) == 1 and len(set(totals)) == 1:   # one batched SDPA
            groups = [(0, len(counts))]
        else:
            groups = [(b, b + 1) for b in range(len(counts))]
        for b0, b1 in groups:
            n, total = counts[b0], totals[b0]
            kp = torch.arange(total)
            if self.dense is None:
                pg = lut[b0:b1][:, kp // PAGE]
                kk = blocks[pg, 0, 0, kp % PAGE].transpose(1, 2)       # [b, nkv, total, d]
                vv = blocks[pg, 1, 0, kp % PAGE].transpose(1, 2)
            else:
                kk, vv = (c[b0:b1, :, :total] for c in self.dense)
            qq = q[offs[b0]:offs[b1]].reshape(b1 - b0, n, nh, d).transpose(1, 2)
            mask = None
            if 1 < n < total:   # new tokens after a cached prefix: a bottom-right causal mask
                qp = total - n + torch.arange(n)
                mask = kp[None, :] <= qp[:, None]
            # No prefix: is_causal, torch's faster path (a boolean mask ran ~1 ms slower of
            # 18 at 512 tokens, BENCHMARKS.md 2026-12-06): the peer at its strongest.
            o = torch.nn.functional.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=mask, is_causal=n > 1 and n == total, enable_gqa=True)
            outs.append(o.transpose(1, 2).reshape((b1 - b0) * n, nh * d))
        return torch.nn.functional.linear(torch.cat(outs), self.wo)


def _step(rng, counts, cached, n_pages, hidden):
    offs = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
    need = [-(-(c + n) // PAGE) for c, n in zip(cached, counts)]
    lut = np.full((len(counts), max(need)), n_pages - 1, np.uint32)
    k = 0
    for b, n in enumerate(need):
        lut[b, :n] = np.arange(k, k + n)
        k += n
    x = rng.standard_normal((sum(counts), hidden)).astype(np.float32)
    maxl = np.array([[max(counts), max(c + n for c, n in zip(cached, counts))]], np.uint32)
    return x, offs, np.array(cached, np.uint32), lut, maxl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="cpu", help="cpu (this host) or e.g. cpu:x86-64:avx2")
    ap.add_argument("--dtype", default="f32", choices=("f32", "bf16"),
                    help="the layer's dtype (torch runs the same dtype; bf16 inputs and cache "
                         "are handed to graphir as bf16 bits, as a bf16 pipeline holds them)")
    ap.add_argument("--compile", default="max-autotune",
                    help="torch.compile mode of the dense layer's peer, or none")
    ap.add_argument("--lead", type=int, default=0,
                    help="untimed calls of the same contender before each timed one (0: plain "
                         "alternation; 1: each measured after its own call, as in a serving "
                         "loop of one framework)")
    ap.add_argument("--roofline", default="roofline_cpu.png",
                    help="where the roofline chart (PNG) goes")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]

    import torch

    from graphir.examples.llama_attention import build, random_weights
    from graphir import DType
    from graphir.lowering import cache
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.session import InferenceSession
    from graphir.lowering.mlir_cpu.cpu_target import host_cpu
    from graphir.tools.bench_mlir_matmul import interleaved_times

    torch.set_num_threads(args.threads)
    os.environ.setdefault("GRAPHIR_NUM_THREADS", str(args.threads))
    from graphir.dtype import to_bits

    dt = DType.bfloat16 if args.dtype == "bf16" else DType.float32
    tdt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = build(dtype=dt)
    weights = random_weights(g, seed=0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphir-bench-cache-") as tmp:
        os.environ["GRAPHIR_CACHE_DIR"] = tmp
        t0 = time.perf_counter()
        art = compile_graph(g, args.target)
        t_compile = time.perf_counter() - t0
        entry = next(Path(tmp).glob("*.gart"))
        key = entry.name[:-len(".gart")]
        t0 = time.perf_counter()
        art2 = cache.lookup(key, art.target)
        from graphir.runtime.cpu import CpuLibrary

        CpuLibrary(art2.file(art2.manifest["library"]))
        t_open = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = InferenceSession().load(art2, weights=weights)
        t_bind = time.perf_counter() - t0
        t0 = time.perf_counter()
        compile_graph(g, args.target)
        t_hit = time.perf_counter() - t0
    assert art2 is not None and art is not None

    from graphir.ops.rope_math import Llama3RopeScaling, rope_freqs_cis

    freqs = rope_freqs_cis(128, 8192, 500000.0, Llama3RopeScaling(8.0, 1.0, 4.0, 8192))
    blocks_t = g.inputs[2].type
    nh, nkv, d = 32, int(blocks_t.shape[4]), int(blocks_t.shape[5])
    ref = TorchLayer(weights, freqs, nh, nkv, d, dtype=tdt)
    rng = np.random.default_rng(1)
    pages_per_seq = -(-(args.context + 1) // PAGE)
    n_pages = max(args.batch * pages_per_seq, -(-args.prefill // PAGE)) + 1
    blocks = rng.standard_normal((n_pages, 2, 1, PAGE, nkv, d)).astype(np.float32)
    cases = [("prefill", [args.prefill], [0]),
             ("decode", [1] * args.batch, [args.context] * args.batch)]
    points: list[Point] = []
    for name, counts, cached in cases:
        x, offs, clen, lut, maxl = _step(rng, counts, cached, n_pages, int(g.inputs[0].type.shape[1]))
        tb = torch.from_numpy(blocks.copy()).to(tdt)
        targs = [torch.from_numpy(x).to(tdt), torch.from_numpy(offs.astype(np.int64)), tb,
                 torch.from_numpy(clen.astype(np.int64)), torch.from_numpy(lut.astype(np.int64))]
        reps = args.reps if name == "prefill" else 4 * args.reps
        max_len = max(cached) + max(counts)
        dense_ref = TorchLayer(weights, freqs, nh, nkv, d, dense=tuple(
            torch.randn(len(counts), nkv, max_len, d).to(tdt) for _ in range(2)), dtype=tdt)
        ours_blocks = to_bits(blocks, dt).copy()   # bf16: the bits, converted once
        x_in = to_bits(x, dt)
        with torch.no_grad():
            want = ref(*targs).float().numpy()
            fns = [lambda: model.execute(x_in, offs, ours_blocks, clen, lut, maxl),
                   lambda: ref(*targs), lambda: dense_ref(*targs)]
            if args.compile != "none":
                seq = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
                pos = targs[3][seq] + torch.arange(len(seq)) - targs[1][:-1][seq]
                torch._dynamo.reset()
                comp = torch.compile(dense_ref.static_step(len(counts), counts[0], max_len),
                                     mode=args.compile, fullgraph=True, dynamic=False)
                # Against the eager dense layer: its cache holds other random data than the
                # paged one, so the eager output on the same cache is the reference.
                dwant = dense_ref(*targs).float()
                c_err = float((comp(targs[0], pos, seq).float() - dwant).abs().max()
                              / dwant.abs().max())
                fns.append(lambda: comp(targs[0], pos, seq))
            t_ours, t_torch, t_dense, *t_comp = interleaved_times(fns, reps, args.lead)
        (got,) = model.execute(x_in, offs, to_bits(blocks, dt).copy(), clen, lut, maxl)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        rows.append((name, t_ours, t_torch, t_dense, err,
                     (t_comp[0], c_err) if t_comp else None))
        work = attention_layer_work(len(counts), cached[0], counts[0], nh, nkv, d,
                                    int(g.inputs[0].type.shape[1]), 2 if args.dtype == "bf16" else 4)
        points += [Point(name, *work, min(t_ours)), Point(f"{name} torch paged", *work,
                   min(t_torch), ours=False), Point(f"{name} torch dense", *work, min(t_dense),
                   ours=False)]

    print(f"{art.target} ({host_cpu().model}), {args.threads} threads; load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
          + (f"{args.lead} untimed call(s) of the same contender before each timed one"
             if args.lead else "contenders in plain alternation"))
    print(f"cold compile (empty cache): {t_compile:.2f} s  (target < 10 s)")
    print(f"open artifact from cache (lookup + sha256 + dlopen): {t_open * 1e3:.1f} ms  "
          f"(target < 100 ms)")
    print(f"bind weights (qkv concat + pack, once): {t_bind * 1e3:.0f} ms;  "
          f"compile_graph cache hit incl. passes + graph print: {t_hit * 1e3:.0f} ms")
    print("case | graphir ms best / median | torch paged ms | graphir/torch paged | "
          "torch dense-cache ms | graphir/torch dense | max rel diff vs torch"
          + (f" | torch.compile({args.compile}) dense ms | graphir/compiled | its rel diff"
             if args.compile != "none" else ""))

    def ms(ts):
        return f"{min(ts) * 1e3:.1f} / {float(np.median(ts)) * 1e3:.1f}"
    for name, to, tt, td, err, comp in rows:
        tail = f" | {ms(comp[0])} | {min(to) / min(comp[0]):.2f} | {comp[1]:.1e}" if comp else ""
        print(f"{name} | {ms(to)} | {ms(tt)} | {min(to) / min(tt):.2f} | {ms(td)} | "
              f"{min(to) / min(td):.2f} | {err:.1e}{tail}")
    bw, peak = machine_limits(torch, tdt)
    print(f"roof: copy {bw / 1e9:.1f} GB/s, torch {args.dtype} GEMM {peak / 1e9:.0f} GFLOP/s "
          f"({args.threads} threads)")
    print(write_chart(points, bw, peak, args.roofline, f"attention layer steps, {art.target}, "
                      f"{args.threads} threads ({args.dtype})"))


def machine_limits(torch, dtype=None) -> tuple[float, float]:
    """The roof of this CPU on the threads torch was given: copy bandwidth (bytes read +
    written per second, 256 MiB, far past the caches) and the GEMM rate in `dtype` (default
    f32; 2048^3), best of five."""
    src = torch.rand(64 << 20)
    dst = torch.empty_like(src)
    a, b = (torch.rand(2048, 2048).to(dtype or torch.float32) for _ in range(2))
    copy, gemm = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.mm(a, b)
        gemm.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / min(copy), 2 * 2048 ** 3 / min(gemm)


if __name__ == "__main__":
    main()
