"""How fast one kernel can read a weight's bytes on this GPU: the ceiling of a one-row GEMV.

Issue 12 asks the 4-bit GEMV at one row for 3x the bf16 cuBLAS matmul and Q4_K / Q6_K for 75% of
copy bandwidth. Both are bounds on one short kernel (8-50 MB: 2-12 us), where the launch, the
first loads' latency and the last wave's drain weigh on top of the bytes. This sweep measures the
best any kernel of ours does at just reading that many bytes: a Triton kernel that XORs its slice
(16-byte loads, U of them issued before the first is used), over a grid of bytes a program, warps,
U and persistent grids, timed exactly as the GEMV sweeps time (CUDA-graph replays, copies rotated over 4x the L2).
Beside it, for the same bytes: torch's device copy (reads and writes them) and, for the bf16
weight, cuBLAS's one-row matmul. The GEMV's best possible time is the read's best.
    python3 tools/gpu_sweeps/read_ceiling.py            (bash tools/gpu_sweep.sh read_ceiling)
    python3 tools/gpu_sweeps/read_ceiling.py --dry-run  (CPU, Triton interpreter, tiny sizes)
Writes $OUT/read_ceiling.json.
"""
from __future__ import annotations

import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dry import DRY  # noqa: E402  (first: --dry-run sets Triton's interpreter up)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import _kernels  # noqa: E402

DEV = "cpu" if DRY else "cuda"
# (what, bytes): the nib layout's bytes of a 4-bit weight (codes + fp16 scales) and Q6_K's,
# for 14336 x 4096 and 4096 x 4096, and the bf16 weight cuBLAS reads.
SIZES = [("tiny", 1 << 16)] if DRY else [
    ("4-bit 14336x4096", 14336 * 4096 * 9 // 16), ("4-bit 4096x4096", 4096 * 4096 * 9 // 16),
    ("Q6_K 14336x4096", 14336 * 4096 * 210 // 256), ("Q6_K 4096x4096", 4096 * 4096 * 210 // 256),
    ("bf16 14336x4096", 14336 * 4096 * 2)]


@triton.jit
def read_kernel(p, out, n_words, CHUNK: tl.constexpr, BLOCK: tl.constexpr, U: tl.constexpr):
    # Program i XORs chunks i, i + grid, ... of CHUNK int32 words (a grid of one program a chunk
    # reads each once; a smaller, persistent grid walks several), U loads of BLOCK words (16
    # bytes a lane, unmasked: every size here is whole chunks) issued before their XORs.
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int32)
    for c in range(tl.program_id(0), n_words // CHUNK, tl.num_programs(0)):
        base = p + c * CHUNK     # below 2**31 words: every size here
        for i in range(CHUNK // (BLOCK * U)):
            for u in tl.static_range(U):
                acc ^= tl.load(base + (i * U + u) * BLOCK + offs)
    tl.store(out + tl.program_id(0), tl.xor_sum(acc, 0))


def confs():
    if DRY:
        return [dict(chunk=4096, warps=1, u=2, waves=0), dict(chunk=2048, warps=1, u=1, waves=1)]
    out = []
    for kb, w, u in itertools.product((2, 8, 32), (1, 2, 4, 8), (1, 2, 4, 8)):
        if kb * 256 >= 128 * w * u:
            out.append(dict(chunk=kb * 256, warps=w, u=u, waves=0))
    # Persistent grids of 4-16 programs an SM walking 8 KB chunks.
    out += [dict(chunk=2048, warps=w, u=u, waves=v) for w, u, v in
            itertools.product((1, 4), (1, 4), (4, 8, 16))]
    return out


def spec(c):
    from graphir.lowering.triton_gpu.kernels.spec import NUM_SMS, KernelSpec

    block = 128 * c["warps"]
    per = NUM_SMS * c["waves"]     # persistent: `waves` programs an SM (0: one a chunk)
    return KernelSpec(
        name=f"read_c{c['chunk']}w{c['warps']}u{c['u']}" + (f"v{c['waves']}" if per else ""),
        fn=read_kernel,
        signature={"p": "*i32", "out": "*i32", "n_words": "i32", "CHUNK": "constexpr",
                   "BLOCK": "constexpr", "U": "constexpr"},
        constexprs=dict(CHUNK=c["chunk"], BLOCK=block, U=c["u"]), num_warps=c["warps"],
        num_stages=1, grid=lambda n: (min(per, n // c["chunk"]) if per else n // c["chunk"], 1, 1),
        grid_args=("n",), divisible_by_16=("p", "out", "n_words"))


def main() -> None:
    from graphir.tools.gpu_timing import copies_to_beat_l2

    results = {"sizes": []}
    if not DRY:
        from graphir.tools.gpu_timing import copy_gbs

        results["copy_gbs"] = copy_gbs()
        print(f"device copy bandwidth {results['copy_gbs']:.0f} GB/s", flush=True)
    specs = {spec(c).name: spec(c) for c in confs()}
    kernels = _kernels.compile_all(specs, DRY)
    for what, nbytes in SIZES:
        n = nbytes // 4
        copies = 2 if DRY else copies_to_beat_l2(nbytes)
        bufs = [torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device=DEV)
                for _ in range(copies)]
        want = _xor(bufs[0])
        rows = []
        for c in confs():
            if n % c["chunk"]:
                continue
            s = spec(c)
            k = kernels[s.name]
            if isinstance(k, Exception):
                print(s.name, "FAILED", str(k)[:200])
                continue
            grid = s.grid_for(n=n)
            outs = torch.empty(grid[0], dtype=torch.int32, device=DEV)
            fns = [lambda b=b: k(grid, b, outs, n) for b in bufs]
            fns[0]()
            got = 0
            for v in outs.tolist():
                got ^= v
            if got != want:
                print(f"{what} {s.name}: WRONG xor {got} != {want}")
                continue
            us = _kernels.timed(fns, DRY)
            rows.append(dict(kernel=s.name, us=us, gbs=nbytes / us / 1e3))
        best = min(rows, key=lambda r: r["us"])
        dsts = [torch.empty_like(b) for b in bufs]
        copy_us = _kernels.timed([lambda b=b, d=d: d.copy_(b) for b, d in zip(bufs, dsts)], DRY)
        entry = dict(what=what, bytes=nbytes, best=best, copy_us=copy_us,
                     top=sorted(rows, key=lambda r: r["us"])[:5])
        if what.startswith("bf16") and not DRY:
            w = [b.view(torch.bfloat16).view(14336, 4096) for b in bufs]
            x = torch.randn(1, 4096, device=DEV).to(torch.bfloat16)
            entry["cublas_us"] = _kernels.timed([lambda w=w_: torch.matmul(x, w.t()) for w_ in w],
                                                DRY)
        results["sizes"].append(entry)
        print(f"{what:18} {nbytes / 1e6:6.1f} MB  read best {best['us']:6.2f} us "
              f"({best['gbs']:5.0f} GB/s, {best['kernel']})  copy_ {copy_us:6.2f} us"
              + (f"  cuBLAS GEMV {entry['cublas_us']:6.2f} us" if "cublas_us" in entry else ""),
              flush=True)
        for r in entry["top"][1:]:
            print(f"{'':27} {r['us']:6.2f} us {r['kernel']}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "read_ceiling.json"), "w") as f:
            json.dump(results, f, indent=1)


def _xor(t) -> int:
    """XOR of every int32 of t (on t's device: a tree of XORs of halves)."""
    t = t.clone()
    while t.numel() > 1:
        if t.numel() % 2:
            t = torch.cat([t, torch.zeros(1, dtype=t.dtype, device=t.device)])
        h = t.numel() // 2
        t = torch.bitwise_xor(t[:h], t[h:])
    return int(t.item())


if __name__ == "__main__":
    main()
