"""GPU benchmarks side by side with torch (run on the H100 by tools/gpu_check.sh).

1. Device copy bandwidth (torch copy_ of 1 GiB; bytes read + written over time).
2. The fused rope_split_store kernel (Llama-3-8B shape, 16K tokens, bf16): achieved bandwidth
   (every byte it must read and write, once) against the copy bandwidth (target >= 80%), and
   time against the unfused torch sequence split -> RoPE(q) -> RoPE(k) -> paged store(k, v)
   (target >= 1.5x).
3. A whole decode step of the Llama-3-8B-shaped attention layer (examples/llama_attention.py:
   batch 64, context 4096, bf16, paged cache of 128-token pages) compiled by graphir and run
   by runtime.cuda (CUDA graphs on), against the same layer in torch eager (paged K/V gathered
   per sequence, SDPA with GQA); per-step wall time, host work included, for both.

Timing: warm-up, then the median of many repetitions, device events around device-only regions
(synchronized wall clock for whole steps), random data. Prints a short table last; with $OUT
set, writes bench_gpu.json there.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NH, NKV, D, HIDDEN, PAGE = 32, 8, 128, 4096, 128
DEV = "cuda"


def event_ms(fn, warmup: int = 10, reps: int = 20, batches: int = 7) -> float:
    """Median over batches of the mean device time of fn() in ms. Calls are queued back to back
    between two events, so host launch latency is hidden, as in a real model step."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times)


def wall_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    """Median wall time of fn() + synchronize in ms (host work included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def stream_ms(fn, stream, reps: int = 30) -> float:
    """Median device time of fn() measured with runtime.cuda events on graphir's stream."""
    from graphir.runtime.cuda import Event

    times = []
    for _ in range(reps):
        a = Event().record(stream)
        fn()
        b = Event().record(stream)
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = event_ms(lambda: dst.copy_(src), reps=30)
    return 2 * n / ms / 1e6  # GB/s


def freqs_table() -> torch.Tensor:
    """The RoPE table of examples/llama_attention.build (theta 5e5, Llama-3.1 scaling)."""
    from graphir.ops.attention_math import Llama3RopeScaling, rope_freqs_cis

    f = rope_freqs_cis(D, 8192, 500000.0, Llama3RopeScaling(8.0, 1.0, 4.0, 8192))
    return torch.from_numpy(np.ascontiguousarray(f, np.float32)).to(DEV)


def paged_batch(batch: int, cached: int, new: int, seed: int):
    """Ragged metadata for `batch` sequences with `cached` tokens each and `new` new tokens."""
    rng = np.random.default_rng(seed)
    max_pages = -(-(cached + new) // PAGE)
    pages = rng.permutation(batch * max_pages).reshape(batch, max_pages).astype(np.uint32)
    offs = (np.arange(batch + 1) * new).astype(np.uint32)
    clen = np.full(batch, cached, np.uint32)
    return offs, clen, pages, batch * max_pages + 1


def torch_positions(offs, clen, lut):
    """Per-token position, page and slot (precomputed: the torch side gets them for free)."""
    lens = np.diff(offs.astype(np.int64))
    seq = np.repeat(np.arange(len(lens)), lens)
    pos = clen.astype(np.int64)[seq] + np.arange(int(offs[-1])) - offs[:-1].astype(np.int64)[seq]
    page = lut.astype(np.int64)[seq, pos // PAGE]
    cuda = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEV)  # noqa: E731
    return cuda(pos), cuda(page), cuda(pos % PAGE), cuda(seq)


def torch_rope(x, cos, sin, heads):
    x = x.view(x.shape[0], heads, D).float()
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1).to(torch.bfloat16)


def torch_rope_store(qkv, freqs, pos, page, slot, blocks, layer=0):
    cos, sin = freqs[pos, 0::2][:, None, :], freqs[pos, 1::2][:, None, :]
    q = torch_rope(qkv[:, : NH * D], cos, sin, NH)
    k = torch_rope(qkv[:, NH * D:(NH + NKV) * D], cos, sin, NKV)
    v = qkv[:, (NH + NKV) * D:].view(-1, NKV, D)
    blocks[page, 0, layer, slot] = k
    blocks[page, 1, layer, slot] = v
    return q.view(-1, NH * D)


def bench_rope_split_store(copy_gbs: float) -> dict:
    from graphir.lowering.triton_gpu.kernels import rope_split_store as rss

    batch, new = 8, 2048
    offs, clen, lut, pages = paged_batch(batch, 0, new, 1)
    T = int(offs[-1])
    qkv = torch.randn(T, (NH + 2 * NKV) * D, device=DEV).to(torch.bfloat16)
    freqs = freqs_table()
    blocks = torch.randn(pages, 2, 1, PAGE, NKV, D, device=DEV).to(torch.bfloat16)
    blocks_t = blocks.clone()
    o, c, lt = (torch.from_numpy(a.astype(np.int32)).to(DEV) for a in (offs, clen, lut))
    ours = lambda: rss.rope_split_store(qkv, o, c, lt, freqs, blocks, 0, NH,  # noqa: E731
                                        interleaved=False)
    pos, page, slot, _ = torch_positions(offs, clen, lut)
    theirs = lambda: torch_rope_store(qkv, freqs, pos, page, slot, blocks_t)  # noqa: E731
    q1, q2 = ours(), theirs()
    err = ((q1.float() - q2.float()).norm() / q2.float().norm()).item()
    kv_err = ((blocks.float() - blocks_t.float()).norm() / blocks_t.float().norm()).item()
    t_ours, t_torch = event_ms(ours), event_ms(theirs)
    nbytes = T * ((NH + 2 * NKV) * D * 2 + NH * D * 2 + 2 * NKV * D * 2 + D * 4)
    gbs = nbytes / t_ours / 1e6
    return {"tokens": T, "ms": t_ours, "torch_ms": t_torch, "GB/s": gbs,
            "copy_fraction": gbs / copy_gbs, "speedup": t_torch / t_ours,
            "q_rel_err": err, "kv_rel_err": kv_err}


def torch_layer(w, freqs):
    wqkv, wo = w

    def step(x, pos, page, slot, seq, lut_t, kv_len, blocks):
        qkv = x @ wqkv.T
        q = torch_rope_store(qkv, freqs, pos, page, slot, blocks)
        B = lut_t.shape[0]
        kv = blocks[lut_t, :, 0]                            # [B, pages, 2, PAGE, NKV, D]
        k = kv[:, :, 0].reshape(B, -1, NKV, D)[:, :kv_len].transpose(1, 2)
        v = kv[:, :, 1].reshape(B, -1, NKV, D)[:, :kv_len].transpose(1, 2)
        qh = q.view(B, 1, NH, D).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(qh, k, v, enable_gqa=True)
        return o.transpose(1, 2).reshape(B, NH * D) @ wo.T
    return step


def bench_decode_step() -> dict:
    from graphir.examples.llama_attention import build
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.cuda import executor

    batch, ctx = 64, 4096
    g = build()
    art = compile_graph(g, "cuda:sm_90")
    rng = np.random.default_rng(0)
    weights = {name: (rng.standard_normal(v.type.static_shape()) / np.sqrt(HIDDEN))
               .astype(np.float32) for name, v in g.weights.items()}
    model = executor.load(art, weights)
    offs, clen, lut, pages = paged_batch(batch, ctx, 1, 2)
    maxl = np.array([[1, ctx + 1]], np.uint32)
    blocks = torch.randn(pages, 2, 1, PAGE, NKV, D, device=DEV).to(torch.bfloat16)
    blocks_t = blocks.clone()
    x = torch.randn(batch, HIDDEN, device=DEV).to(torch.bfloat16)
    ours = lambda: model.execute(x, offs, blocks, clen, lut, maxl)  # noqa: E731
    bf = lambda a: torch.from_numpy(a).to(DEV).to(torch.bfloat16)  # noqa: E731
    wqkv = bf(np.concatenate([weights[f"{p}_proj.weight"] for p in "qkv"]))
    wo = bf(weights["o_proj.weight"])
    freqs = freqs_table()
    pos, page, slot, seq = torch_positions(offs, clen, lut)
    lut_t = torch.from_numpy(lut.astype(np.int64)).to(DEV)
    layer = torch_layer((wqkv, wo), freqs)
    theirs = lambda: layer(x, pos, page, slot, seq, lut_t, ctx + 1, blocks_t)  # noqa: E731
    (y,) = ours()
    y = torch.from_dlpack(y).float()
    want = theirs().float()
    err = ((y - want).norm() / want.norm()).item()
    t_ours, t_torch = wall_ms(ours, reps=30), wall_ms(theirs, reps=30)
    t_ours_dev = stream_ms(ours, model.executor.dev.stream)
    return {"batch": batch, "context": ctx, "ms": t_ours, "device_ms": t_ours_dev,
            "torch_ms": t_torch, "speedup": t_torch / t_ours, "rel_err_vs_torch": err,
            "graphs": len(model.executor._graphs)}


def main() -> int:
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(0)
    results = {"device": name, "torch": torch.__version__}
    results["copy_GB/s"] = copy_bandwidth()
    results["rope_split_store"] = bench_rope_split_store(results["copy_GB/s"])
    results["decode_step"] = bench_decode_step()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_gpu.json").write_text(json.dumps(results, indent=1))
    r, d = results["rope_split_store"], results["decode_step"]
    rows = [
        ("device", name, ""),
        ("copy bandwidth (torch copy_, 1 GiB)", f"{results['copy_GB/s']:.0f} GB/s", ""),
        ("rope_split_store fused, 16K tokens", f"{r['ms'] * 1e3:.1f} us, {r['GB/s']:.0f} GB/s",
         f"{100 * r['copy_fraction']:.0f}% of copy (target >= 80%)"),
        ("  torch unfused split/rope/store", f"{r['torch_ms'] * 1e3:.1f} us",
         f"fused {r['speedup']:.2f}x faster (target >= 1.5x)"),
        ("  q / kv rel err vs torch", f"{r['q_rel_err']:.1e} / {r['kv_rel_err']:.1e}", ""),
        ("decode step 8B layer, b64 ctx4096 (graphir)", f"{d['ms']:.3f} ms wall",
         f"{d['device_ms']:.3f} ms device, {d['graphs']} CUDA graph(s)"),
        ("  torch eager", f"{d['torch_ms']:.3f} ms wall",
         f"graphir {d['speedup']:.2f}x faster (target > 1x)"),
        ("  rel err vs torch", f"{d['rel_err_vs_torch']:.1e}", "(target <= 2e-2)"),
    ]
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    print("\n" + "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows))
    ok = (r["copy_fraction"] >= 0.8 and r["speedup"] >= 1.5 and d["speedup"] > 1
          and d["rel_err_vs_torch"] <= 2e-2 and r["q_rel_err"] <= 2e-2)
    print(f"targets {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
