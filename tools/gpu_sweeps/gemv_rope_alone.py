"""The one-token qkv GEMV alone (matmul_skinny.gemv_kernel, gemv2x256_w2_s1) against the fused
qkv GEMV + rope_split_store kernel (kernels/gemv_rope_store.py) with half-split pairs (rows r and
r + 64: the layer's) and interleaved ones (rows 2 i, 2 i + 1: adjacent), kernel time by CUPTI
(median of 60 launches over three weights, so no weight stays in the L2).
    python3 tools/gpu_sweeps/gemv_rope_alone.py
"""
from __future__ import annotations

import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layer_ab import bg  # noqa: E402
from graphir.lowering.triton_gpu.kernels import gemv_rope_store as grs  # noqa: E402
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc  # noqa: E402


def cupti_us(fns, name: str, rounds: int = 20) -> float:
    for f in fns:
        f()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            for f in fns:
                f()
        torch.cuda.synchronize()
    return statistics.median(e.device_time_total for e in prof.events()
                             if e.device_type == torch.autograd.DeviceType.CUDA
                             and name in e.name)


def main() -> None:
    s = bg.LLAMA8B
    N, K = (s.nh + 2 * s.nkv) * s.d, s.hidden
    x = torch.randn(1, K, device="cuda").to(torch.bfloat16)
    ws = [torch.randn(N, K, device="cuda").to(torch.bfloat16) / 64 for _ in range(3)]
    m = bg.paged_meta(s, 1, 4096, 1, 0)
    o, c, lt = (torch.from_numpy(m[k].astype(np.int32)).cuda() for k in ("offs", "clen", "lut"))
    freqs = bg.freqs_table(s)
    blocks = torch.zeros(lt.numel() + 1, 2, 1, s.page, s.nkv, s.d, device="cuda",
                         dtype=torch.bfloat16)
    q = torch.empty(1, s.nh * s.d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
    plain = [lambda w=w: mc.run_torch(x, w, out=out, config="gemv2x256_w2_s1") for w in ws]
    rows = {"gemv2x256_w2_s1 (plain)": cupti_us(plain, "gemv_kernel")}
    for il in (False, True):
        for meta in (1, 3):
            sp = grs.spec(s.nh, s.nkv, s.d, s.page, "bfloat16", "float32", il, False, K, 1, 256,
                          2, False, meta)
            fns = [lambda w=w, sp=sp: sp.fn[sp.grid_for()](
                x, w, x, o, c, lt, freqs, blocks, q, K, 1, lt.shape[1], 0, 1,
                blocks.shape[0], freqs.shape[0], **sp.constexprs) for w in ws]
            rows[f"fused, {'interleaved' if il else 'half-split'}, meta {meta}"] = \
                cupti_us(fns, "gemv_rope_store")
    print(torch.cuda.get_device_name(), f"N {N} x K {K}, one row, us:")
    for k, v in rows.items():
        print(f"  {k:36s} {v:6.2f}")


if __name__ == "__main__":
    main()
