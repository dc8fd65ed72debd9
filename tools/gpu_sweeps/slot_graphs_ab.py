"""The decode step with its upload inside the CUDA graph (one graph per staging slot,
runtime/cuda/slot_graphs.py) against the upload as its own copy before the graph: the layer
of tools/bench_gpu.py loaded both ways in one process, wall time per step with synchronize
and host enqueue per call, in alternated rounds. Both outputs are checked against torch eager
first, and against each other (the same kernels on the same data: equal bits).
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


def main(rounds: int) -> None:
    from graphir.examples.llama_attention import build
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.cuda import executor, slot_graphs

    g = build()
    art = compile_graph(g, "cuda:sm_90")
    weights = bg.random_weights(g)
    models = {}
    for on in (True, False):
        slot_graphs.ENABLED = on  # read when an executor loads
        models[on] = executor.load(art, weights, stream=torch.cuda.current_stream())
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
        for on, model in models.items():
            for _ in range(6):  # capture, then a graph per staging slot (and direct ones)
                (y,) = model.execute(*args)
            ys[on] = torch.from_dlpack(y).clone()
            errs[on] = rel_err(ys[on], want)
        same = torch.equal(ys[True], ys[False])
        wall, enq = {True: [], False: []}, {True: [], False: []}
        for r in range(rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                fn = lambda model=models[on]: model.execute(*args)  # noqa: E731
                wall[on].append(wall_ms(fn, reps=100))
                enq[on].append(enqueue_ms(fn, reps=100))
        for on in (True, False):
            name = "in the graph" if on else "own copy"
            print(f"{case:22s} {name:12s} {statistics.median(wall[on]):8.4f} "
                  f"{statistics.median(enq[on]):8.4f} {errs[on]:9.1e}   "
                  f"walls {' '.join(f'{v:.4f}' for v in wall[on])}")
        st = models[True].executor.stats
        print(f"{'':22s} outputs equal: {same}; slot graphs captured {st['slot_captures']}, "
              f"own-copy model's {models[False].executor.stats['slot_captures']}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
