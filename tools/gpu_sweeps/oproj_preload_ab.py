"""The B1 decode step's o_proj GEMV loading the start of its weight before its PDL wait
(matmul_skinny.gemv_kernel's PRELOAD_K), now that a kernel with early reads is launched early
whatever its grid (runtime/cuda/kernel.py): its programs become resident while the paged decode
runs, which leaves most of the bandwidth idle at one row, and stream part of the weight there.
The twenty-seventh session's preload A/B could not show this: the GEMV was never launched early
then. Builds from the shipped table with the o_proj m1 entry replaced, one process, checked
against torch eager, then synchronized walls in alternated rounds and each kernel's time.
    python3 tools/gpu_sweeps/oproj_preload_ab.py [rounds] [config ...]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layer_ab import alternated_walls, load_variants, report  # noqa: E402
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc  # noqa: E402

O = "N=4096,K=4096"
CANDIDATES = [mc.gemv(2, 1024, 1, preload=1024), mc.gemv(2, 1024, 1, preload=2048),
              mc.gemv(2, 256, 2, preload=1024), mc.gemv(4, 512, 2, preload=1024),
              mc.gemv(2, 512, 1, preload=2048)]
for c in CANDIDATES:
    mc.BY_NAME[c["name"]] = c


def main(rounds: int, names: list[str]) -> None:
    import torch

    variants = {"shipped": {}, **{n: {(O, "m1"): n} for n in names}}
    fns, errs, outs = load_variants("decode B1 ctx4096", variants)
    wall = alternated_walls(fns, rounds)
    print(f"{torch.cuda.get_device_name()}; decode B1 ctx4096; {rounds} alternated rounds of "
          f"100 synchronized steps")
    report(fns, errs, wall)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5,
         sys.argv[2:] or [c["name"] for c in CANDIDATES])
