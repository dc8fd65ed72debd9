"""The layer's decode step with its one-row projections preloading their weights before the PDL
wait (matmul_skinny.gemv_kernel's PRELOAD_K) against the shipped GEMVs, in the layer: the
preload can only pay where the kernel ahead leaves bandwidth idle (the B1 step's paged decode
before o_proj, the upload before the qkv GEMV), which a standalone sweep never shows.

Each variant is compiled from the shipped table with the m1 entries of both projections
(N 6144 and 4096, K 4096) replaced, loaded in one process and checked against torch eager;
then wall per step (synchronized) in alternated rounds, device time per step queued back to
back, and one profiled run per variant (each kernel's time and the step span, synchronized).
    python3 tools/gpu_sweeps/gemv_preload_ab.py [rounds] [qkv_config/o_config ...]
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_gpu as bg  # noqa: E402
from graphir.tools.gpu_timing import enqueue_ms, event_ms, rel_err, wall_ms  # noqa: E402

CASE = "decode B1 ctx4096"
QKV, O = "N=6144,K=4096", "N=4096,K=4096"
VARIANTS = ("gemv2x256_w2_s1_pre1024/gemv2x1024_w1_s1_pre1024",
            "gemv2x256_w2_s1_pre2048/gemv2x1024_w1_s1_pre2048",
            "gemv2x256_w2_s1_pre512/gemv2x1024_w1_s1_pre2048",
            "gemv2x256_w2_s1/gemv2x1024_w1_s1_pre2048",
            "gemv2x256_w2_s1_pre1024/gemv2x1024_w1_s1")


def _compile(g, pair: str | None):
    """The layer's artifact from the shipped table, its m1 projections set to `pair`."""
    from graphir.lowering.driver import compile_graph
    from graphir.lowering.triton_gpu import tuning

    shipped = tuning.DEFAULTS_PATH
    if pair is None:
        return compile_graph(g, "cuda:sm_90")
    table = copy.deepcopy(json.loads(shipped.read_text()))
    for shape, cfg in zip((QKV, O), pair.split("/")):
        table["families"]["matmul"]["bf16"][shape]["m1"] = cfg
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "table.json"
        p.write_text(json.dumps(table))
        tuning.DEFAULTS_PATH = p      # read by the compile's Selector and its cache key
        try:
            return compile_graph(g, "cuda:sm_90")
        finally:
            tuning.DEFAULTS_PATH = shipped


def _profile(fn, steps: int = 30) -> tuple[list[tuple[str, float]], float]:
    """[(kernel, median us)] in step order and the median step span (first kernel start to
    last kernel end, the upload excluded), steps synchronized as a serving loop runs them."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
            torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and e.device_time_total > 0), key=lambda e: e.time_range.start)
    per = len(evs) // steps
    durs, spans = [[] for _ in range(per)], []
    for s in range(steps):
        step = evs[s * per:(s + 1) * per]
        ks = [e for e in step if "Memcpy" not in e.name and "upload_staged" not in e.name]
        spans.append(ks[-1].time_range.end - ks[0].time_range.start)
        for i, e in enumerate(step):
            durs[i].append(e.time_range.end - e.time_range.start)
    names = [e.name[:28] for e in evs[:per]]
    return [(n, statistics.median(d)) for n, d in zip(names, durs)], statistics.median(spans)


def main(rounds: int, pairs: tuple[str, ...]) -> None:
    from graphir.examples.llama_attention import build
    from graphir.runtime.cuda import executor

    g = build()
    weights = bg.random_weights(g)
    models = {}
    for p in (None,) + pairs:
        models[p or "shipped"] = executor.load(_compile(g, p), weights,
                                              stream=torch.cuda.current_stream())
    s = bg.LLAMA8B
    batch, cached, new = bg.CASES[CASE]
    x, m, k_cache, v_cache, blocks = bg.layer_inputs(s, batch, cached, new, seed=len(CASE))
    args = (x, m["offs"], blocks, m["clen"], m["lut"], m["maxl"])
    wqkv, wo = bg.torch_weights(weights)
    want = bg.TorchLayer(s, wqkv, wo, bg.freqs_table(s), k_cache.clone(), v_cache.clone())(
        x, cached, new)
    fns, errs, outs = {}, {}, {}
    for name, model in models.items():
        fns[name] = lambda model=model: model.execute(*args)
        for _ in range(6):  # capture, then a graph per staging slot
            (y,) = fns[name]()
        outs[name] = torch.from_dlpack(y).clone()
        errs[name] = rel_err(outs[name], want)
    same = {n: bool(torch.equal(o, outs["shipped"])) for n, o in outs.items()}
    wall = {n: [] for n in fns}
    for r in range(rounds):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            wall[n].append(wall_ms(fns[n], reps=100))
    print(f"{torch.cuda.get_device_name()}; {CASE}; {rounds} rounds, alternated; wall and "
          f"enqueue ms a step, device us (steps synchronized)")
    for n, fn in fns.items():
        kernels, span = _profile(fn)
        print(f"{n:50s} wall {statistics.median(wall[n]):.4f} (rounds "
              f"{' '.join(f'{v:.4f}' for v in wall[n])}) queued {event_ms(fn, calls=20):.4f} "
              f"enqueue {enqueue_ms(fn):.4f} rel err {errs[n]:.1e} bits equal to shipped "
              f"{same[n]}")
        print(f"{'':50s} span {span:.1f} us: " + ", ".join(f"{k} {t:.1f}" for k, t in kernels))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5, tuple(sys.argv[2:]) or VARIANTS)
