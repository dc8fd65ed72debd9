"""rope_split_store at a few tokens: one program a token walking its head chunks (the decode
spec) against a program per head chunk (the decode_heads spec, rss.SPLIT_ELEMS elements a
chunk), alone and in the layer's decode step.

Alone: each form's kernel time (CUPTI, median of 50 launches) at 1-24 tokens, checked first
against torch (rope in float32, the paged store). In the layer: the step compiled twice (the
head-split grid off: rss.SPLIT_PROGRAMS = 0; on: shipped), loaded in one process, checked
against torch eager, then synchronized wall per step in alternated rounds and each kernel's time.
    python3 tools/gpu_sweeps/rope_decode_ab.py [rounds]
"""
from __future__ import annotations

import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layer_ab import (alternated_walls, bg, compile_switched, kernel_times,  # noqa: E402
                       load_variants, step_events)
from graphir.lowering.triton_gpu.kernels import rope_split_store as rss  # noqa: E402
from graphir.tools.gpu_timing import rel_err  # noqa: E402

FORMS = {"token (decode)": dict(split_heads=False, head_block=None),
         "heads x8 (decode_heads)": dict(split_heads=True, head_block=8),
         "heads x16": dict(split_heads=True, head_block=16)}


def kernel_us(fn, launches: int = 50) -> float:
    """The one kernel of fn: median us over `launches` profiled calls."""
    return statistics.median(e.time_range.end - e.time_range.start
                             for (e,) in step_events(fn, launches))


def alone() -> None:
    s = bg.LLAMA8B
    print(f"rope_split_store alone, us (32 / 8 heads of 128, pages of {s.page}, ctx 4096)")
    print(f"{'tokens':>6s} " + " ".join(f"{n:>24s}" for n in FORMS))
    freqs = bg.freqs_table(s)
    for T in (1, 2, 4, 8, 16, 24):
        m = bg.paged_meta(s, T, 4096, 1, T)
        o, c, lt = (torch.from_numpy(m[k].astype(np.int32)).to(bg.DEV)
                    for k in ("offs", "clen", "lut"))
        qkv = torch.randn(T, (s.nh + 2 * s.nkv) * s.d, device=bg.DEV).to(torch.bfloat16)
        pos = torch.full((T,), 4096, device=bg.DEV)
        page, slot = lt.long()[torch.arange(T, device=bg.DEV), pos // s.page], pos % s.page
        cos, sin = freqs[pos, 0::2][:, None], freqs[pos, 1::2][:, None]
        q_want = bg.rope_half(qkv[:, :s.nh * s.d].view(T, s.nh, s.d), cos, sin).view(T, -1)
        k_want = bg.rope_half(qkv[:, s.nh * s.d:(s.nh + s.nkv) * s.d].view(T, s.nkv, s.d),
                              cos, sin)
        v_want = qkv[:, (s.nh + s.nkv) * s.d:].view(T, s.nkv, s.d)
        row = []
        for kw in FORMS.values():
            blocks = torch.full((lt.numel() + 1, 2, 1, s.page, s.nkv, s.d), float("nan"),
                                device=bg.DEV, dtype=torch.bfloat16)
            fn = lambda kw=kw, blocks=blocks: rss.rope_split_store(  # noqa: E731
                qkv, o, c, lt, freqs, blocks, 0, s.nh, interleaved=False, **kw)
            q = fn()
            err = max(rel_err(q, q_want), rel_err(blocks[page, 0, 0, slot], k_want),
                      rel_err(blocks[page, 1, 0, slot], v_want))
            assert err < 1e-2, (T, kw, err)
            row.append(f"{kernel_us(fn):8.2f} (err {err:.0e})")
        print(f"{T:6d} " + " ".join(f"{r:>24s}" for r in row))


def in_layer(rounds: int) -> None:
    bg.CASES["decode B8 ctx4096"] = (8, 4096, 1)
    variants = {"token grid": 0, "head grid": rss.SPLIT_PROGRAMS}
    for case in ("decode B1 ctx4096", "decode B8 ctx4096"):
        fns, errs, outs = load_variants(case, variants, compile_switched(rss, "SPLIT_PROGRAMS"))
        same = torch.equal(*outs.values())
        wall = alternated_walls(fns, rounds)
        print(f"\n{torch.cuda.get_device_name()}; {case}; {rounds} alternated rounds of 100 "
              f"synchronized steps; outputs equal: {same}")
        for n, fn in fns.items():
            ks, span = kernel_times(fn)
            rope = [f"{t:.2f}" for k, t in ks if "rope" in k]
            print(f"{n:12s} wall {statistics.median(wall[n]) * 1e3:6.1f} us  span {span:5.1f} "
                  f"us  rope {'/'.join(rope)} us  rel err {errs[n]:.1e}  walls "
                  f"{' '.join(f'{v * 1e3:.1f}' for v in wall[n])}")
            print("   " + ", ".join(f"{k} {t:.1f}" for k, t in ks))


if __name__ == "__main__":
    alone()
    in_layer(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
