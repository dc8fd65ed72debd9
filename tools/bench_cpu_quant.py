"""Benchmark: a decode step of the GGUF- or GPTQ-quantized attention layer vs the same layer in
float32, both compiled by graphir for the CPU in one run.

Run: .venv/bin/python tools/bench_cpu_quant.py [--encoding Q4_K | Q4_K_M | Q6_K | GPTQ4 | GPTQ8 ...]
     [--batch 1] [--context 1024]
     [--kernels]   (each kernel's time too, as the interleaved rounds run)

The layer is Llama-3-8B shaped (hidden 4096, 32 heads, 8 KV heads, head dim 128, page size 128,
interleaved RoPE as GGUF checkpoints use): GGUFQAttentionWithRope with its q/k/v/o weights as
GGUF blocks (qmatmul dequantizes tiles inside the matmul loop) against AttentionWithRope with
the float32 weights those blocks decode to (packed once at load); GPTQ4 / GPTQ8:
GPTQAttentionWithRope over symmetric 4- / 8-bit checkpoints (group 128, rounded to nearest,
desc_act off) instead. Prints the CPU target, the
load average before and after, best and median decode-step times of both over --reps rounds
(each round times both, so a load from other processes hits them alike), the ratio
float32 / quantized of the best times (target >= 3 for Q4_K: it reads ~7x fewer weight bytes),
the weight bytes each reads per step, and the max relative difference of their outputs; and
this CPU's f32 FMA peak on 1 and on --threads threads, measured in the same run (on a shared
machine two vCPUs can deliver one core's worth: the quantized layer is compute-bound, the
float32 one bandwidth-bound, so that moves the ratio).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, NH, NKV, D, PAGE = 4096, 32, 8, 128, 128
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
# What llama.cpp's Q4_K_M files hold in an attention layer: attn_v in Q6_K, the rest Q4_K
# (it alternates attn_v between Q6_K and Q4_K over the layers).
MIXES = {"Q4_K_M": {"q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q6_K", "o_proj": "Q4_K"}}


GPTQ_BITS = {"GPTQ4": 4, "GPTQ8": 8}
GPTQ_GROUP = 128


def _encodings(enc: str) -> dict[str, str]:
    """Each projection's encoding: one for all, or a llama.cpp mix (MIXES)."""
    return MIXES.get(enc, dict.fromkeys(PROJ, enc))


def _layers(enc: str):
    from graphir import DeviceRef, DType
    from graphir.nn import (AttentionWithRope, GGUFQAttentionWithRope, KVCacheParams,
                            RotaryEmbedding)

    dev = DeviceRef.CPU()
    rope = RotaryEmbedding(HIDDEN, NH, 500000.0, 8192, head_dim=D, interleaved=True, device=dev)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=NKV, head_dim=D, num_layers=1,
                        page_size=PAGE, devices=(dev,))
    common = dict(rope=rope, num_attention_heads=NH, num_key_value_heads=NKV, hidden_size=HIDDEN,
                  kv_params=kvp, devices=[dev])
    if enc in GPTQ_BITS:
        from graphir.nn import GPTQAttentionWithRope
        from graphir.ops import QuantizationConfig

        cfg = QuantizationConfig(bits=GPTQ_BITS[enc], group_size=GPTQ_GROUP, sym=True)
        quant = GPTQAttentionWithRope(cfg, **common)
    else:
        quant = GGUFQAttentionWithRope(dtype=DType.uint8, quantization_encoding=_encodings(enc),
                                       **common)
    return rope, kvp, quant, AttentionWithRope(dtype=DType.float32, **common)


def _graph(attn, rope, kvp, name: str):
    from graphir import DeviceRef, DType, Graph, TensorType
    from graphir.nn import PagedCacheValues

    dev = DeviceRef.CPU()
    types = [TensorType(DType.float32, ["total_seq_len", HIDDEN], dev),
             TensorType(DType.uint32, ["batch + 1"], dev)] + kvp.input_types(dev)
    with Graph(name, input_types=types) as g:
        x, offs, blocks, clen, lut, maxl = g.inputs
        g.output(attn(0, x, PagedCacheValues(blocks, clen, lut, maxl), rope.freqs_cis, offs))
    return g


def _weights(enc: str, seed: int):
    """(quantized tensors per projection: GGUF blocks or GPTQ checkpoint tensors, the float32
    weights they decode to)."""
    from graphir.ops.quant.gguf_blocks import dequantize_gguf
    from graphir.ops.quant.gguf_quantize import quantize_gguf

    rng = np.random.default_rng(seed)
    shapes = {"q_proj": (NH * D, HIDDEN), "k_proj": (NKV * D, HIDDEN),
              "v_proj": (NKV * D, HIDDEN), "o_proj": (HIDDEN, NH * D)}
    quant, dense = {}, {}
    for name, (out, n_in) in shapes.items():
        w = (rng.standard_normal((out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        if enc in GPTQ_BITS:
            tensors, dense[f"{name}.weight"] = _gptq_rtn(w, GPTQ_BITS[enc])
            quant.update({f"{name}.{k}": v for k, v in tensors.items()})
            continue
        blocks = quantize_gguf(w, _encodings(enc)[name])
        quant[f"{name}.weight"] = blocks
        dense[f"{name}.weight"] = dequantize_gguf(blocks, _encodings(enc)[name], n_in)
    return quant, dense


def _gptq_rtn(w: np.ndarray, bits: int):
    """Symmetric GPTQ checkpoint tensors of w `[out, in]` rounded to nearest per group of
    GPTQ_GROUP inputs (what GPTQ's solver starts from; the layer's speed does not depend on
    the codes), and the float32 weight `[out, in]` they decode to."""
    from graphir.ops.quant.gptq import dequantize_gptq
    from graphir.ops.quant.gptq_layout import pack_rows

    wt = w.T.astype(np.float64)                                    # [in, out]
    n_in, n_out = wt.shape
    mid = 1 << (bits - 1)
    g = wt.reshape(n_in // GPTQ_GROUP, GPTQ_GROUP, n_out)
    scales = (np.abs(g).max(axis=1) / (mid - 1)).astype(np.float16)
    s = np.maximum(scales.astype(np.float64), 1e-8)[:, None, :]
    codes = np.clip(np.rint(g / s) + mid, 0, 2 * mid - 1).astype(np.uint8).reshape(n_in, n_out)
    qweight = pack_rows(codes, bits)
    dq = dequantize_gptq(qweight, scales, None, None, GPTQ_GROUP, bits=bits)
    return {"qweight": qweight, "scales": scales}, np.ascontiguousarray(dq.T, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoding", default="Q4_K",
                    help="one GGUF encoding for every projection, Q4_K_M (v_proj in Q6_K), "
                         "or GPTQ4 / GPTQ8 (GPTQAttentionWithRope)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="cpu", help="cpu (this host) or e.g. cpu:x86-64:avx2")
    ap.add_argument("--kernels", action="store_true",
                    help="also print each kernel's best / median time over the rounds")
    args = ap.parse_args()
    os.environ.setdefault("GRAPHIR_NUM_THREADS", str(args.threads))
    load_before = os.getloadavg()[0]

    from graphir.lowering.driver import compile_graph
    from graphir.lowering.mlir_cpu.cpu_target import host_cpu
    from graphir.runtime.session import InferenceSession
    from graphir.lowering.mlir_cpu.cpu_target import host_target
    from graphir.tools.bench_mlir_matmul import interleaved_times, measure_peak

    rope, kvp, quant, dense = _layers(args.encoding)
    wq, wd = _weights(args.encoding, seed=0)
    quant.load_state_dict(wq)
    g_q, g_d = _graph(quant, rope, kvp, "quant"), _graph(dense, rope, kvp, "dense")
    with tempfile.TemporaryDirectory(prefix="graphir-bench-quant-") as tmp:
        os.environ["GRAPHIR_CACHE_DIR"] = tmp
        art_q, art_d = compile_graph(g_q, args.target), compile_graph(g_d, args.target)
        m_q = InferenceSession().load(art_q, weights=quant.state_dict())
        m_d = InferenceSession().load(art_d, weights=wd)

    rng = np.random.default_rng(1)
    b, ctx = args.batch, args.context
    per_seq = -(-(ctx + 1) // PAGE)
    n_pages = b * per_seq + 1
    blocks = rng.standard_normal((n_pages, 2, 1, PAGE, NKV, D)).astype(np.float32)
    lut = np.arange(b * per_seq, dtype=np.uint32).reshape(b, per_seq)
    offs = np.arange(b + 1, dtype=np.uint32)
    clen = np.full(b, ctx, np.uint32)
    maxl = np.array([[1, ctx + 1]], np.uint32)
    x = rng.standard_normal((b, HIDDEN)).astype(np.float32)
    bq, bd = blocks.copy(), blocks.copy()
    kernel_times = _time_kernels({"q": m_q, "f32": m_d}) if args.kernels else None
    t_q, t_d = interleaved_times([lambda: m_q.execute(x, offs, bq, clen, lut, maxl),
                                  lambda: m_d.execute(x, offs, bd, clen, lut, maxl)], args.reps)
    (y_q,) = m_q.execute(x, offs, blocks.copy(), clen, lut, maxl)
    (y_d,) = m_d.execute(x, offs, blocks.copy(), clen, lut, maxl)
    err = float(np.abs(y_q - y_d).max() / np.abs(y_d).max())
    with tempfile.TemporaryDirectory(prefix="graphir-bench-peak-") as tmp:
        peaks = [measure_peak(host_target(), n, Path(tmp)) for n in (1, args.threads)]
    bytes_q = sum(v.nbytes for v in wq.values())
    bytes_d = sum(v.nbytes for v in wd.values())

    print(f"{art_q.target} ({host_cpu().model}), {args.threads} threads; load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"decode step: batch {b}, context {ctx}, hidden {HIDDEN}, {NH}/{NKV} heads, "
          f"head dim {D}; {args.reps} rounds")
    print("layer | weight MB read | best ms | median ms")
    kind = "" if args.encoding in GPTQ_BITS else "GGUF "
    for name, ts, nb in ((f"{kind}{args.encoding}", t_q, bytes_q), ("float32", t_d, bytes_d)):
        print(f"{name} | {nb / 1e6:.1f} | {min(ts) * 1e3:.2f} | {statistics.median(ts) * 1e3:.2f}")
    print(f"float32 / {args.encoding} (best): {min(t_d) / min(t_q):.2f}x  (target >= 3 for Q4_K);"
          f" median: {statistics.median(t_d) / statistics.median(t_q):.2f}x")
    print(f"max relative difference of the outputs: {err:.2e}")
    print(f"f32 FMA peak: {peaks[0]:.0f} GFLOP/s on 1 thread, {peaks[1]:.0f} on {args.threads}")
    if kernel_times:
        print("kernel (each call's wall time, Python's call overhead included; timing them "
              "turns the runtime's replay off, so the step times above include ~80 us more host "
              "work) | best us | median us")
        for name, ts in kernel_times.items():
            if ts:   # kernels that ran at load only have none
                print(f"{name} | {min(ts) * 1e6:.0f} | {statistics.median(ts) * 1e6:.0f}")


def _time_kernels(models: dict) -> dict:
    """Wrap each loaded CPU model's kernel functions to record their wall times per call
    (name -> list, filled as the rounds run); the step times then include the wrapper's
    ~1 us a kernel."""
    import time

    times = {}
    for tag, m in models.items():
        for name, fn in list(m._fns.items()):
            ts = times.setdefault(f"{tag} {name}", [])

            def timed(ins, outs, fn=fn, ts=ts):
                t0 = time.perf_counter()
                fn(ins, outs)
                ts.append(time.perf_counter() - t0)
            m._fns[name] = timed
    return times


if __name__ == "__main__":
    main()
