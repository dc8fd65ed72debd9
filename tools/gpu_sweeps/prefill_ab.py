"""A persistent prefill kernel against earlier copies of its modules, timed in alternation.

    mkdir old && for m in flash_attention_persistent flash_attention_tiles; do
      git show REV:lowering/triton_gpu/kernels/$m.py > old/$m.py; done
    python3 tools/gpu_sweeps/prefill_ab.py old CONFIG [SHAPE ...]

CONFIG names a persistent WS config (e.g. m128n128w4s2tmawspersistdynqtma); SHAPE names
tools/gpu_sweeps/attention.py's shapes (default c2k w4k c4k c16k). Both kernels are checked
against SDPA first, then timed in rounds (old, new, old, ...; attention.PAIRED_ROUNDS): the
median and range of new-over-old speed and of new over SDPA, so clock drift moves both sides of
a ratio alike. Each copy (named as its module in lowering/triton_gpu/kernels; the directory
must hold flash_attention_persistent.py) is imported as its own module, `old_<name>`, its
imports of the other copies pointed at theirs; everything else it imports is today's.
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as A  # noqa: E402

from graphir.lowering.triton_gpu.kernels import flash_attention as fa  # noqa: E402
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc  # noqa: E402
from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import (  # noqa: E402
    flash_prefill_ws_kernel)


def old_call(module, shape, cfg):
    """A callable launching the old module's form of `cfg` at `shape` (as attention.ours)."""
    name, B, S, D, mask, window = shape
    p = A.problem(shape)
    lut, blocks = p["shuffled"]
    kernel, cx = module.persistent_kernel(
        flash_prefill_ws_kernel, fa.ws_constexprs(A.NH, A.NKV, D, A.PAGE, mask, cfg))
    return lambda: fa.launch(kernel, p["q"], p["offs"], p["clen"], lut, blocks, 0, window,
                             D ** -0.5, S, cfg["BLOCK_M"], cx, True, programs=132, num_warps=4)


def old_modules(directory: str):
    """The old flash_attention_persistent module, with the directory's other copies as its
    (and each other's) imports."""
    names = [f[:-3] for f in os.listdir(directory) if f.endswith(".py")]
    out = tempfile.mkdtemp(prefix="old_kernels_")
    for name in names:
        with open(os.path.join(directory, name + ".py")) as f:
            src = f.read()
        for other in names:
            src = src.replace(f"graphir.lowering.triton_gpu.kernels.{other} ", f"old_{other} ")
            src = src.replace(f"graphir.lowering.triton_gpu.kernels.{other}\n",
                              f"old_{other}\n")
        with open(os.path.join(out, f"old_{name}.py"), "w") as f:
            f.write(src)
    sys.path.insert(0, out)
    return importlib.import_module("old_flash_attention_persistent")


def main():
    directory, config, *names = sys.argv[1:]
    module = old_modules(directory)
    cfg = fc.get(config)
    A.set_allocator()
    print("| shape | new / old (median [range]) | new / SDPA | SDPA | rel err old, new |")
    print("| --- | --- | --- | --- | --- |")
    for name in names or ["c2k", "w4k", "c4k", "c16k"]:
        shape = next(s for s in A.SHAPES if s[0] == name)
        want, sdpa_ms, _, _, sdpa = A.reference(shape)
        new, old = A.ours(shape, cfg), old_call(module, shape, cfg)
        errs = [A.rel_err(f(), want) for f in (old, new)]
        if not max(errs) < A.TOL:
            print(f"| {name} | rel err {errs}: not timed | | | |", flush=True)
            continue
        # attention.paired: ms of the first over ms of the second, a round at a time.
        r, s = A.paired(shape, old, new), A.paired(shape, sdpa, new)
        print(f"| {name} | {r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] | "
              f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}] | "
              f"{A.flops(shape) / sdpa_ms / 1e9:.0f} TFLOP/s | {errs[0]:.1e}, {errs[1]:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
