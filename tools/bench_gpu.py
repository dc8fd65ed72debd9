"""GPU benchmark of the Llama-3-8B-shaped attention layer (examples/llama_attention.py), side
by side with torch in the same run (tools/gpu_check.sh runs it on the H200).

Rows:
1. Device copy bandwidth and the cuBLAS bf16 rate: the physical limits below use them.
2. The fused rope_split_store kernel (16K tokens): bandwidth against copy (target >= 90%) and
   time against the unfused torch split -> RoPE -> paged store.
3. The layer, compiled by graphir and run by runtime.cuda on torch's stream (CUDA graphs on):
   decode B64 x ctx 4096 and B1 x ctx 4096 (wall per step with synchronize, and the host's
   enqueue time per call without it; also with the executor's own stream, which orders
   itself after torch's current stream with an event per call), prefill B4 x 2048 and
   B1 x 8192 new tokens. Peers: the same math
   in torch on a contiguous cache (qkv projection, RoPE, cache write, SDPA with GQA, o_proj)
   eager and under torch.compile (modes from $GRAPHIR_BENCH_COMPILE, comma-separated, default
   "reduce-overhead,max-autotune-no-cudagraphs"; "none" skips; compile time reported;
   GRAPHIR_BENCH_CASES=prefill keeps the cases naming "prefill"), and the
   physical limit (decode: weights + K/V read + new K/V written + x and the output, over the
   copy bandwidth; prefill: FLOPs at the cuBLAS rate). graphir's output is checked against
   torch eager at every shape. Every case's graphir numbers are taken before any
   torch.compile peer runs (its worker processes would share the CPU with them).
4. Per case, the host work of one call by phase (tools/host_profile.py; the CPU-only twin of
   this row runs there on a fake driver): signature, fast ragged check, staging slot, the
   copies, the graph launch, the event; and the general path's whole call for comparison.
   The full ragged check (the one misses run) is timed alone for the decode cases.

Every part is guarded (a failure is reported, the rest runs). The table prints last; with $OUT
set, everything goes to $OUT/bench_gpu.json too.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphir.tools.gpu_timing import (copy_gbs, enqueue_ms, event_ms, gemm_tflops,  # noqa: E402
                                      graph_ms, rel_err, table, wall_ms)
from graphir.tools.roofline import Point, attention_layer_work, write_chart  # noqa: E402

DEV = "cuda"
MODES = [m for m in os.environ.get("GRAPHIR_BENCH_COMPILE",
                                   "reduce-overhead,max-autotune-no-cudagraphs").split(",")
         if m.strip() and m.strip() != "none"]
CASES = {  # name: (batch, cached tokens, new tokens per sequence)
    "decode B64 ctx4096": (64, 4096, 1),
    "decode B1 ctx4096": (1, 4096, 1),
    "prefill B4x2048": (4, 0, 2048),
    "prefill B1x8192": (1, 0, 8192),
}
# GRAPHIR_BENCH_CASES=prefill (comma-separated substrings) keeps the cases that name one: the
# max-autotune peer compiles for minutes a shape, more than one call's budget for all four.
_only = [w for w in os.environ.get("GRAPHIR_BENCH_CASES", "").split(",") if w.strip()]
CASES = {k: v for k, v in CASES.items() if not _only or any(w.strip() in k for w in _only)}


@dataclass(frozen=True)
class Shape:
    """The layer's sizes (examples/llama_attention.build; TINY is build_tiny)."""

    nh: int = 32
    nkv: int = 8
    d: int = 128
    hidden: int = 4096
    page: int = 128
    theta: float = 500000.0
    max_seq: int = 8192
    scaling: tuple = (8.0, 1.0, 4.0, 8192)
    layer: int = 0
    layers: int = 1


LLAMA8B = Shape()
TINY = Shape(4, 2, 16, 64, 4, 10000.0, 64, (8.0, 1.0, 4.0, 32), layer=1, layers=2)


def freqs_table(s: Shape, device=DEV) -> torch.Tensor:
    from graphir.ops.rope_math import Llama3RopeScaling, rope_freqs_cis

    f = rope_freqs_cis(s.d, s.max_seq, s.theta, Llama3RopeScaling(*s.scaling))
    return torch.from_numpy(np.ascontiguousarray(f, np.float32)).to(device)


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE in float32, rounded back to x's dtype."""
    h = x.shape[-1] // 2
    a, b = x[..., :h].float(), x[..., h:].float()
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1).to(x.dtype)


class TorchLayer(torch.nn.Module):
    """The layer's math on a contiguous cache [batch, n_kv_heads, max_len, head_dim]: what a
    torch user writes (cuBLAS projections, SDPA with GQA), for a uniform batch."""

    def __init__(self, s: Shape, wqkv, wo, freqs, k_cache, v_cache):
        super().__init__()
        self.s = s
        for name, t in (("wqkv", wqkv), ("wo", wo), ("freqs", freqs), ("k_cache", k_cache),
                        ("v_cache", v_cache)):
            self.register_buffer(name, t)

    def forward(self, x: torch.Tensor, start: int, new: int) -> torch.Tensor:
        s, b = self.s, self.k_cache.shape[0]
        qkv = (x @ self.wqkv.T).view(b, new, s.nh + 2 * s.nkv, s.d)
        q, k, v = qkv.split([s.nh, s.nkv, s.nkv], dim=2)
        f = self.freqs[start:start + new]
        cos, sin = f[:, None, 0::2], f[:, None, 1::2]
        q, k = rope_half(q, cos, sin), rope_half(k, cos, sin)
        self.k_cache[:, :, start:start + new] = k.transpose(1, 2)
        self.v_cache[:, :, start:start + new] = v.transpose(1, 2)
        end = start + new
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), self.k_cache[:, :, :end], self.v_cache[:, :, :end],
            is_causal=new > 1, enable_gqa=True)
        return o.transpose(1, 2).reshape(b * new, s.nh * s.d) @ self.wo.T


def paged_from_contiguous(s: Shape, k_cache, v_cache, lut: np.ndarray) -> torch.Tensor:
    """The paged blocks holding the same K/V as the contiguous cache (plus one null page)."""
    b, nkv, length, d = k_cache.shape
    pages = lut.shape[1]
    blocks = torch.zeros(b * pages + 1, 2, s.layers, s.page, nkv, d, dtype=k_cache.dtype,
                         device=k_cache.device)
    idx = torch.from_numpy(lut.reshape(-1).astype(np.int64)).to(k_cache.device)
    for kind, c in enumerate((k_cache, v_cache)):
        paged = c[:, :, :pages * s.page].reshape(b, nkv, pages, s.page, d).permute(0, 2, 3, 1, 4)
        blocks[idx, kind, s.layer] = paged.reshape(b * pages, s.page, nkv, d)
    return blocks


def paged_meta(s: Shape, batch: int, cached: int, new: int, seed: int) -> dict:
    """Ragged metadata of a uniform batch; each sequence's pages scattered over the pool."""
    pages = -(-(cached + new) // s.page)
    lut = np.random.default_rng(seed).permutation(batch * pages).reshape(batch, pages)
    return dict(offs=(np.arange(batch + 1) * new).astype(np.uint32),
                clen=np.full(batch, cached, np.uint32), lut=lut.astype(np.uint32),
                maxl=np.array([[new, cached + new]], np.uint32))


def layer_inputs(s: Shape, batch: int, cached: int, new: int, seed: int, device=DEV,
                 dtype=torch.bfloat16):
    """x, the ragged metadata, and matching contiguous / paged caches with random contents."""
    g = torch.Generator(device=device).manual_seed(seed)
    meta = paged_meta(s, batch, cached, new, seed)
    length = meta["lut"].shape[1] * s.page
    k_cache = torch.randn(batch, s.nkv, length, s.d, generator=g, device=device).to(dtype)
    v_cache = torch.randn(batch, s.nkv, length, s.d, generator=g, device=device).to(dtype)
    x = torch.randn(batch * new, s.hidden, generator=g, device=device).to(dtype)
    return x, meta, k_cache, v_cache, paged_from_contiguous(s, k_cache, v_cache, meta["lut"])


def random_weights(graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(v.type.static_shape()) / np.sqrt(v.type.static_shape()[-1]))
            .astype(np.float32) for n, v in graph.weights.items()}


def torch_weights(w: dict, dtype=torch.bfloat16, device=DEV):
    t = lambda a: torch.from_numpy(a).to(device).to(dtype)  # noqa: E731
    return t(np.concatenate([w[f"{p}_proj.weight"] for p in "qkv"])), t(w["o_proj.weight"])


# ---------------------------------------------------------------------------------- benches
def guarded(results: dict, name: str, fn, *args):
    t0 = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as e:  # noqa: BLE001  (reported; the other parts still run)
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    results[name]["bench_s"] = round(time.perf_counter() - t0, 1)
    print(f"[{name}] {json.dumps(results[name])[:400]}", flush=True)


def bench_rope_split_store(copy: float) -> dict:
    from graphir.lowering.triton_gpu.kernels import rope_split_store as rss

    s, batch, new = LLAMA8B, 8, 2048
    meta = paged_meta(s, batch, 0, new, 1)
    T = batch * new
    qkv = torch.randn(T, (s.nh + 2 * s.nkv) * s.d, device=DEV).to(torch.bfloat16)
    freqs = freqs_table(s)
    pages = meta["lut"].size + 1
    blocks = torch.randn(pages, 2, 1, s.page, s.nkv, s.d, device=DEV).to(torch.bfloat16)
    blocks_t = blocks.clone()
    o, c, lt = (torch.from_numpy(meta[k].astype(np.int32)).to(DEV) for k in ("offs", "clen", "lut"))
    ours = lambda: rss.rope_split_store(qkv, o, c, lt, freqs, blocks, 0, s.nh,  # noqa: E731
                                        interleaved=False)
    pos = torch.arange(new, device=DEV).repeat(batch)
    seq = torch.arange(batch, device=DEV).repeat_interleave(new)
    page = lt.long()[seq, pos // s.page]
    slot = pos % s.page
    cos, sin = freqs[pos, 0::2][:, None], freqs[pos, 1::2][:, None]

    def theirs():
        q = rope_half(qkv[:, :s.nh * s.d].view(T, s.nh, s.d), cos, sin)
        k = rope_half(qkv[:, s.nh * s.d:(s.nh + s.nkv) * s.d].view(T, s.nkv, s.d), cos, sin)
        blocks_t[page, 0, 0, slot] = k
        blocks_t[page, 1, 0, slot] = qkv[:, (s.nh + s.nkv) * s.d:].view(T, s.nkv, s.d)
        return q.view(T, -1)

    q1, q2 = ours(), theirs()
    err, kv_err = rel_err(q1, q2), rel_err(blocks, blocks_t)
    t_ours, t_torch = graph_ms(ours, calls=20), graph_ms(theirs, calls=20)
    nbytes = T * ((s.nh + 2 * s.nkv) * s.d * 2 + s.nh * s.d * 2 + 2 * s.nkv * s.d * 2 + s.d * 4)
    gbs = nbytes / t_ours / 1e6
    return {"tokens": T, "ms": t_ours, "torch_ms": t_torch, "GB/s": gbs,
            "copy_fraction": gbs / copy, "speedup": t_torch / t_ours, "q_rel_err": err,
            "kv_rel_err": kv_err}


def layer_work(s: Shape, batch: int, cached: int, new: int) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of one layer step in bf16 (tools/roofline.attention_layer_work)."""
    return attention_layer_work(batch, cached, new, s.nh, s.nkv, s.d, s.hidden, 2)


def decode_limit_ms(s: Shape, batch: int, cached: int, new: int, copy: float) -> float:
    """Bytes the step must move once over the device copy bandwidth (copy_gbs: bytes read +
    written per second, from queued SM copies): the weights, the K/V read (cached and new
    tokens), the new K/V written, x read and the output written."""
    return layer_work(s, batch, cached, new)[1] / (copy * 1e6)


def prefill_limit_ms(s: Shape, batch: int, new: int, tflops: float) -> float:
    """FLOPs (projections + causal attention) at the cuBLAS bf16 rate."""
    return layer_work(s, batch, 0, new)[0] / (tflops * 1e9)


class GraphirLayer:
    """The compiled layer, loaded twice: on torch's stream and on the executor's own."""

    def __init__(self):
        from graphir.examples.llama_attention import build
        from graphir.lowering.driver import compile_graph
        from graphir.runtime.cuda import executor

        g = build()
        t0 = time.perf_counter()
        art = compile_graph(g, "cuda:sm_90")
        self.compile_s = time.perf_counter() - t0
        self.weights = random_weights(g)
        t0 = time.perf_counter()
        self.model = executor.load(art, self.weights, stream=torch.cuda.current_stream())
        self.load_s = time.perf_counter() - t0
        self.own = executor.load(art, self.weights)


def bench_layer(case: str, gl: GraphirLayer, copy: float, tflops: float, later: dict) -> dict:
    """graphir and torch eager on one case; what the torch.compile peers need goes to
    `later[case]` (main runs them after every graphir case: torch.compile's worker
    processes then never share the CPU with graphir's host-bound measurements)."""
    s = LLAMA8B
    batch, cached, new = CASES[case]
    x, m, k_cache, v_cache, blocks = layer_inputs(s, batch, cached, new, seed=len(case))
    wqkv, wo = torch_weights(gl.weights)
    freqs = freqs_table(s)
    args = (x, m["offs"], blocks, m["clen"], m["lut"], m["maxl"])
    ours = lambda: gl.model.execute(*args)  # noqa: E731
    layer = TorchLayer(s, wqkv, wo, freqs, k_cache.clone(), v_cache.clone())
    eager = lambda: layer(x, cached, new)  # noqa: E731
    (y,) = ours()
    want = eager()
    out = {"batch": batch, "cached": cached, "new": new,
           "rel_err": rel_err(torch.from_dlpack(y), want)}
    decode = new == 1
    reps = 100 if decode else 20
    out["graphir_ms"] = wall_ms(ours, reps=reps)
    out["graphir_enqueue_ms"] = enqueue_ms(ours, reps=reps)
    out["graphir_queued_ms"] = event_ms(ours, calls=20)
    # Synchronized before each call (outside the timers): the phases then hold host work
    # only, not waits for a staging slot the GPU still reads.
    out["host_us"] = host_breakdown(gl.model.executor,
                                    lambda: (torch.cuda.synchronize(), ours()))
    out["eager_ms"] = wall_ms(eager, reps=reps)
    out["eager_enqueue_ms"] = enqueue_ms(eager, reps=reps)
    if decode:
        own = lambda: gl.own.execute(*args)  # noqa: E731
        out["graphir_own_stream_ms"] = wall_ms(own, reps=reps)
        out["graphir_own_stream_enqueue_ms"] = enqueue_ms(own, reps=reps)
        out["limit_ms"] = decode_limit_ms(s, batch, cached, new, copy)
        out["ragged_check_ms"] = ragged_check_ms(gl.model.executor, args)
    else:
        out["limit_ms"] = prefill_limit_ms(s, batch, new, tflops)
    out["stats"] = dict(gl.model.executor.stats)
    later[case] = (layer, x, cached, new, want, reps)
    return out


def compiled_peer(layer: TorchLayer, mode: str, x, cached: int, new: int, want, reps: int):
    try:
        torch._dynamo.reset()  # one mode at a time; earlier compiled shapes are done with
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        twin = TorchLayer(layer.s, layer.wqkv, layer.wo, layer.freqs, layer.k_cache.clone(),
                          layer.v_cache.clone())
        fn = torch.compile(twin, mode=mode, dynamic=False)
        t0 = time.perf_counter()
        for _ in range(3):  # compile, autotune, record the CUDA graph (reduce-overhead)
            y = fn(x, cached, new)
        torch.cuda.synchronize()
        res = {"compile_s": time.perf_counter() - t0, "rel_err_vs_eager": rel_err(y, want)}
        res["ms"] = wall_ms(lambda: fn(x, cached, new), reps=reps)
        res["enqueue_ms"] = enqueue_ms(lambda: fn(x, cached, new), reps=reps)
        return res
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def host_breakdown(ex, call) -> dict:
    """Microseconds per call of each host phase of a cache hit (tools/host_profile.py: timers
    around the executor's phase methods and its driver calls), and the whole call's host
    time on the general path (the fast path switched off) for comparison."""
    from graphir.tools.host_profile import host_phases

    out = host_phases(ex, call, calls=500)
    fast = ex._fast
    try:
        ex._fast = False
        with_sync = host_phases(ex, call, calls=200)
        out["general path (total)"] = with_sync.get("general path (misses)", float("nan"))
    finally:
        ex._fast = fast
    return out


def ragged_check_ms(ex, args) -> float:
    """Host time of the ragged metadata check alone, per call (as execute runs it)."""
    host = {1: args[1], 3: args[3], 4: args[4]}
    shapes = tuple(tuple(a.shape) for a in args)
    env, _, bounds = ex._bind(shapes)
    get, n = host.__getitem__, 2000
    for _ in range(100):
        ex._ragged.check(get, env, bounds)
    t0 = time.perf_counter()
    for _ in range(n):
        ex._ragged.check(get, env, bounds)
    return (time.perf_counter() - t0) / n * 1e3


# ---------------------------------------------------------------------------------- report
def fmt_ms(v) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v * 1e3:.0f}us" if v < 1 else f"{v:.2f}ms"


def rows_for(case: str, r: dict) -> list:
    if "error" in r:
        return [[case, "ERR " + r["error"][:60]]]
    peers = [r["eager_ms"]] + [r[m]["ms"] for m in MODES if "ms" in r.get(m, {})]
    best_compile = min([r[m]["ms"] for m in MODES if "ms" in r.get(m, {})] or [float("nan")])
    g = r["graphir_ms"]
    cells = [fmt_ms(r.get(m, {}).get("ms")) for m in MODES]
    if r["new"] == 1:
        target = (f"{best_compile / g:.2f}x compile (>=1.2x) {r['limit_ms'] / g:.0%} of limit "
                  f"(>=75%)" if r["batch"] > 1 else f"<=60us: {'ok' if g <= 0.06 else 'NO'}")
    else:
        target = f"{r['eager_ms'] / g:.2f}x eager (>=1.1x) {best_compile / g:.2f}x compile (>=1x)"
    rows = [[case + " wall", fmt_ms(g), fmt_ms(r["eager_ms"]), *cells, fmt_ms(r["limit_ms"]),
             f"{min(peers) / g:.2f}x", f"{r['rel_err']:.1e}", target]]
    enq = [fmt_ms(r.get(m, {}).get("enqueue_ms")) for m in MODES]
    rows.append(["  host enqueue/call", fmt_ms(r["graphir_enqueue_ms"]),
                 fmt_ms(r["eager_enqueue_ms"]), *enq, "", "", "",
                 f"queued {fmt_ms(r['graphir_queued_ms'])}/step"])
    host = r.get("host_us") or {}
    if host:
        short = {"signature (shapes, bytes)": "sig", "ragged check + facts": "ragged",
                 "  acquire staging slot": "slot", "  HtoD copy (1 call)": "HtoD",
                 "  DtoD copies of tensors": "DtoD", "  graph launch (1 call)": "launch",
                 "  end call (event record)": "end", "general path (total)": "general"}
        rows.append(["  host us/call", "", "", *[""] * len(MODES), "", "", "",
                     " ".join(f"{short[k]} {v:.1f}" for k, v in host.items() if k in short)])
    if "graphir_own_stream_ms" in r:
        rows.append(["  own stream (event order)", fmt_ms(r["graphir_own_stream_ms"]), "",
                     *[""] * len(MODES), "", "", "",
                     f"enqueue {fmt_ms(r['graphir_own_stream_enqueue_ms'])}, full ragged "
                     f"check {fmt_ms(r['ragged_check_ms'])} (a hit runs the fast one: "
                     f"'ragged' above)"])
    return rows


def roofline_points(res: dict) -> list[Point]:
    """The chart's points: rope_split_store against the unfused torch ops, and each layer case
    for graphir, torch eager and each torch.compile mode (wall time per step)."""
    pts = []
    r = res.get("rope_split_store", {})
    if "ms" in r:
        s = LLAMA8B
        rot = r["tokens"] * (s.nh + s.nkv) * s.d   # rotated values: 2 mul + 1 add each
        nbytes = r["GB/s"] * r["ms"] * 1e6
        pts += [Point("rope_split_store", 3 * rot, nbytes, r["ms"] / 1e3),
                Point("torch split+rope+store", 3 * rot, nbytes, r["torch_ms"] / 1e3, ours=False)]
    for case, cr in res.get("layer", {}).items():
        if "graphir_ms" not in cr:
            continue
        flops, nbytes = layer_work(LLAMA8B, cr["batch"], cr["cached"], cr["new"])
        pts.append(Point(case, flops, nbytes, cr["graphir_ms"] / 1e3))
        pts.append(Point(f"{case} eager", flops, nbytes, cr["eager_ms"] / 1e3, ours=False))
        pts += [Point(f"{case} {m.split('-')[0]}", flops, nbytes, cr[m]["ms"] / 1e3, ours=False)
                for m in MODES if "ms" in cr.get(m, {})]
    return pts


def main() -> int:
    torch.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "compile_modes": MODES}
    res["copy_GB/s"] = copy_gbs()
    res["gemm_TFLOP/s"] = gemm_tflops()
    guarded(res, "rope_split_store", bench_rope_split_store, res["copy_GB/s"])
    layer = {}
    try:
        gl = GraphirLayer()
        res["graphir_compile_s"], res["graphir_load_s"] = gl.compile_s, gl.load_s
        later: dict = {}
        for case in CASES:
            guarded(layer, case, bench_layer, case, gl, res["copy_GB/s"], res["gemm_TFLOP/s"],
                    later)
        for case in list(later):
            peer = later.pop(case)  # its tensors go once its peers are done
            for mode in MODES:
                layer[case][mode] = compiled_peer(peer[0], mode, *peer[1:])
                print(f"[{case} {mode}] {json.dumps(layer[case][mode])[:300]}", flush=True)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        layer = {c: {"error": f"{type(e).__name__}: {e}"[:300]} for c in CASES}
    res["layer"] = layer
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_gpu.json").write_text(json.dumps(res, indent=1))
    head = ["what", "graphir", "eager", *[m.replace("max-autotune-no-cudagraphs", "cmp-maxat")
                                          .replace("reduce-overhead", "cmp-ro") for m in MODES],
            "limit", "vs best", "rel err", "target"]
    r = res["rope_split_store"]
    rows = [["copy / cuBLAS", f"{res['copy_GB/s']:.0f}GB/s", f"{res['gemm_TFLOP/s']:.0f}TF/s"]]
    if "error" in r:
        rows.append(["rope_split_store 16K", "ERR " + r["error"][:60]])
    else:
        rows.append(["rope_split_store 16K", fmt_ms(r["ms"]), fmt_ms(r["torch_ms"]),
                     *[""] * len(MODES), "", f"{r['speedup']:.2f}x", f"{r['q_rel_err']:.1e}",
                     f"{r['copy_fraction']:.0%} of copy (>=90%)"])
    for case, cr in layer.items():
        rows += rows_for(case, cr)
    comp = [f"{m}: " + ", ".join(f"{layer[c][m]['compile_s']:.0f}s" for c in CASES
                                 if "compile_s" in layer.get(c, {}).get(m, {})) for m in MODES]
    print("\ntorch.compile time per shape: " + ("; ".join(comp) or "skipped"))
    print(table(rows, head))
    print(write_chart(roofline_points(res), res["copy_GB/s"] * 1e9, res["gemm_TFLOP/s"] * 1e12,
                      Path(os.environ.get("OUT", "."), "roofline_gpu.png"),
                      f"attention layer steps, {res['device']} (bf16)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
