"""The decode step with its upload inside the CUDA graph (one graph per staging slot,
runtime/cuda/slot_graphs.py) as the upload kernel (runtime/cuda/upload_kernel.py) or as a
copy node, against the upload as its own copy before the graph: the layer of
tools/bench_gpu.py loaded three ways in one process, wall time per step with synchronize and
host enqueue per call, in rounds of rotating order. Every output is checked against torch
eager first, and against the others (the same kernels on the same data: equal bits).
    python3 tools/gpu_sweeps/slot_graphs_ab.py [rounds]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_gpu as bg  # noqa: E402
from graphir.tools.gpu_timing import enqueue_ms, rel_err, wall_ms  # noqa: E402

CASES = ("decode B1 ctx4096", "decode B64 ctx4096")
MODES = ("kernel node", "copy node", "own copy")


def main(rounds: int) -> None:
    from graphir.examples.llama_attention import build
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.cuda import executor, slot_graphs

    g = build()
    art = compile_graph(g, "cuda:sm_90")
    weights = bg.random_weights(g)
    models = {}
    for mode in MODES:
        slot_graphs.ENABLED = mode != "own copy"  # read when an executor loads
        models[mode] = executor.load(art, weights, stream=torch.cuda.current_stream())
    slot_graphs.ENABLED = True
    wqkv, wo = bg.torch_weights(weights)
    print(f"{torch.cuda.get_device_name()}; {rounds} rounds, alternated; ms per step")
    print(f"{'case':22s} {'upload':12s} {'wall':>8s} {'enqueue':>8s} {'rel err':>9s}")
    for case in CASES:
        s = bg.LLAMA8B
        batch, cached, new = bg.CASES[case]
        x, m, k_cache, v_cache, blocks = bg.layer_inputs(s, batch, cached, new, seed=len(case))
        args = (x, m["offs"], blocks, m["clen"], m["lut"], m["maxl"])
        layer = bg.TorchLayer(s, wqkv, wo, bg.freqs_table(s), k_cache.clone(), v_cache.clone())
        want = layer(x, cached, new)
        ys, errs = {}, {}
        for mode, model in models.items():
            # the slot graphs are captured in these calls: the kernel or the copy node then
            os.environ["GRAPHIR_UPLOAD_KERNEL"] = "0" if mode == "copy node" else "1"
            for _ in range(6):  # capture, then a graph per staging slot (and direct ones)
                (y,) = model.execute(*args)
            ys[mode] = torch.from_dlpack(y).clone()
            errs[mode] = rel_err(ys[mode], want)
        os.environ.pop("GRAPHIR_UPLOAD_KERNEL")
        same = all(torch.equal(ys[MODES[0]], ys[m]) for m in MODES[1:])
        wall, enq = ({m: [] for m in MODES} for _ in range(2))
        for r in range(rounds):
            for i in range(len(MODES)):
                mode = MODES[(r + i) % len(MODES)]
                fn = lambda model=models[mode]: model.execute(*args)  # noqa: E731
                wall[mode].append(wall_ms(fn, reps=100))
                enq[mode].append(enqueue_ms(fn, reps=100))
        for mode in MODES:
            print(f"{case:22s} {mode:12s} {statistics.median(wall[mode]):8.4f} "
                  f"{statistics.median(enq[mode]):8.4f} {errs[mode]:9.1e}   "
                  f"walls {' '.join(f'{v:.4f}' for v in wall[mode])}")
        launches = {m: models[m].executor.dev._upload_kernel.launches for m in MODES}
        print(f"{'':22s} outputs equal: {same}; slot graphs captured "
              f"{[models[m].executor.stats['slot_captures'] for m in MODES]}, upload kernel "
              f"launches {list(launches.values())} ({', '.join(MODES)})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
