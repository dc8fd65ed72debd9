"""The B1 decode step's qkv GEMV started under the metadata upload: the upload kernel lets the
next kernel launch at once (upload.TRIGGER) and the GEMV waits for it only before its store
(a `_late` config: it reads x and its weight, which the upload does not write). Variants
compiled in one process (no cache), checked against torch eager, then synchronized wall per
step in alternated rounds and each kernel's time.
    python3 tools/gpu_sweeps/late_wait_ab.py [rounds]
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _layer_ab  # noqa: E402
from _layer_ab import alternated_walls, kernel_times, load_variants  # noqa: E402
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc  # noqa: E402
from graphir.lowering.triton_gpu.kernels import upload  # noqa: E402

SHAPE, BUCKET, SHIPPED = "N=6144,K=4096", "m1", "gemv2x256_w2_s1"
LATE = mc.gemv(2, 256, 2, late=True)
mc.BY_NAME[LATE["name"]] = LATE
_plain_compile = _layer_ab.compile_with


def _compile(g, v):
    upload.TRIGGER = v["trigger"]
    try:
        return _plain_compile(g, {(SHAPE, BUCKET): v["qkv"]} if v["qkv"] != SHIPPED else {})
    finally:
        upload.TRIGGER = False


def main(rounds: int) -> None:
    import torch
    from graphir.lowering import driver

    # a file per build: the upload flag is not part of the cache key, and a cache entry once
    # written is kept (the second build would load the first's artifact)
    import tempfile
    from pathlib import Path

    orig = driver.compile_graph
    driver.compile_graph = lambda g, t, **kw: orig(
        g, t, out=Path(tempfile.mkdtemp()) / "ab.gart", **kw)
    _layer_ab.compile_with = _compile
    variants = {"shipped": {"trigger": False, "qkv": SHIPPED},
                "late qkv only": {"trigger": False, "qkv": LATE["name"]},
                "upload trigger": {"trigger": True, "qkv": SHIPPED},
                "trigger + late qkv": {"trigger": True, "qkv": LATE["name"]}}
    fns, errs, outs = load_variants("decode B1 ctx4096", variants)
    ref = outs["shipped"]
    wall = alternated_walls(fns, rounds)
    print(f"{torch.cuda.get_device_name()}; decode B1 ctx4096; {rounds} alternated rounds of "
          f"100 synchronized steps")
    for n, fn in fns.items():
        ks, span = kernel_times(fn)
        print(f"{n:20s} wall {statistics.median(wall[n]) * 1e3:6.1f} us  span {span:5.1f} us  "
              f"rel err {errs[n]:.1e}  equal to shipped {torch.equal(outs[n], ref)}  walls "
              f"{' '.join(f'{v * 1e3:.1f}' for v in wall[n])}")
        print("   " + ", ".join(f"{k} {t:.1f}" for k, t in ks))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
