"""The decode step with its upload inside the CUDA graph (one graph per staging slot,
runtime/cuda/slot_graphs.py; first, or beside the launches that read no metadata) against
the upload as its own copy before the graph: the layer
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
# upload: its own copy before the graph; first in the graph; beside the leading launches that
# read no metadata (the qkv projection)
MODES = {"own copy": (False, False), "graph, first": (True, False),
         "graph, beside": (True, True)}


def main(rounds: int) -> None:
    from graphir.examples.llama_attention import build
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.cuda import executor, slot_graphs

    g = build()
    art = compile_graph(g, "cuda:sm_90")
    weights = bg.random_weights(g)
    models = {}
    for mode, (on, fork) in MODES.items():
        slot_graphs.ENABLED, slot_graphs.FORK = on, fork  # read when an executor loads
        models[mode] = executor.load(art, weights, stream=torch.cuda.current_stream())
    slot_graphs.ENABLED = slot_graphs.FORK = True
    wqkv, wo = bg.torch_weights(weights)
    print(f"{torch.cuda.get_device_name()}; {rounds} rounds, alternated; ms per step")
    print(f"{'case':22s} {'upload':14s} {'wall':>8s} {'enqueue':>8s} {'rel err':>9s}")
    for case in CASES:
        s = bg.LLAMA8B
        batch, cached, new = bg.CASES[case]
        x, m, k_cache, v_cache, blocks = bg.layer_inputs(s, batch, cached, new, seed=len(case))
        args = (x, m["offs"], blocks, m["clen"], m["lut"], m["maxl"])
        layer = bg.TorchLayer(s, wqkv, wo, bg.freqs_table(s), k_cache.clone(), v_cache.clone())
        want = layer(x, cached, new)
        ys, errs = {}, {}
        for mode, model in models.items():
            for _ in range(6):  # capture, then a graph per staging slot (and direct ones)
                (y,) = model.execute(*args)
            ys[mode] = torch.from_dlpack(y).clone()
            errs[mode] = rel_err(ys[mode], want)
        same = all(torch.equal(ys["own copy"], y) for y in ys.values())
        wall = {m: [] for m in MODES}
        enq = {m: [] for m in MODES}
        order = list(MODES)
        for r in range(rounds):
            for mode in (order if r % 2 == 0 else order[::-1]):
                fn = lambda model=models[mode]: model.execute(*args)  # noqa: E731
                wall[mode].append(wall_ms(fn, reps=100))
                enq[mode].append(enqueue_ms(fn, reps=100))
        for mode in MODES:
            print(f"{case:22s} {mode:14s} {statistics.median(wall[mode]):8.4f} "
                  f"{statistics.median(enq[mode]):8.4f} {errs[mode]:9.1e}   "
                  f"walls {' '.join(f'{v:.4f}' for v in wall[mode])}")
        caps = {m: models[m].executor.stats["slot_captures"] for m in MODES}
        forked = not models["graph, beside"].executor.dev._fork_failed
        print(f"{'':22s} outputs equal: {same}; slot graphs captured {caps}; fork kept: "
              f"{forked}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
