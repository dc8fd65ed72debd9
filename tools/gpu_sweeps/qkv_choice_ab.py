"""The B64 decode step with its qkv projection (M 64, N 6144, K 4096) on the shipped choice
(cuBLASLt) against Triton tiles, in the layer rather than alone: profiled on an H100 the
cuBLASLt kernel, the step graph's first kernel, started 6.2 us after the upload node where the
B1 step's Triton GEMV started 2.6 us after it, a start the standalone sweep (the same kernel
back to back) never sees. Each variant is compiled from the shipped table with that one entry
replaced, loaded in one process and checked against torch eager; then wall per step (with
synchronize) in alternated rounds, device time per step queued back to back, and one profiled
run per variant (the first kernel's start after the copy, its time, the step span).
    python3 tools/gpu_sweeps/qkv_choice_ab.py [rounds] [config ...]
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
from graphir.tools.gpu_timing import event_ms, rel_err, wall_ms  # noqa: E402

CASE, SHAPE, BUCKET = "decode B64 ctx4096", "N=6144,K=4096", "m64"
TRITON = ("t64x64x64_g1_w4_s6", "t64x32x128_g1_w4_s5", "t64x64x128_g1_w4_s4_k2")


def _compile(g, config: str | None):
    """The layer's artifact from the shipped table, its qkv m64 entry set to `config`."""
    from graphir.lowering.driver import compile_graph
    from graphir.lowering.triton_gpu import tuning

    shipped = tuning.DEFAULTS_PATH
    if config is None:
        return compile_graph(g, "cuda:sm_90")
    table = copy.deepcopy(json.loads(shipped.read_text()))
    table["families"]["matmul"]["bf16"][SHAPE][BUCKET] = config
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "table.json"
        p.write_text(json.dumps(table))
        tuning.DEFAULTS_PATH = p      # read by the compile's Selector and its cache key
        try:
            return compile_graph(g, "cuda:sm_90")
        finally:
            tuning.DEFAULTS_PATH = shipped


def _profile(fn, steps: int = 20) -> tuple[float, float, float, str]:
    """(gap from the copy to the first kernel, the first kernel's time, step span) in us,
    medians over `steps` profiled steps, and the first kernel's name."""
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
    gaps, firsts, spans, name = [], [], [], ""
    for s in range(steps):
        step = evs[s * per:(s + 1) * per]
        ks = [e for e in step if "Memcpy" not in e.name]
        cp = [e for e in step if "Memcpy" in e.name]
        if cp:
            gaps.append(ks[0].time_range.start - cp[0].time_range.end)
        firsts.append(ks[0].time_range.end - ks[0].time_range.start)
        spans.append(ks[-1].time_range.end - ks[0].time_range.start)
        name = ks[0].name[:40]
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    return med(gaps), med(firsts), med(spans), name


def main(rounds: int, configs: tuple[str, ...]) -> None:
    from graphir.examples.llama_attention import build
    from graphir.runtime.cuda import executor

    g = build()
    weights = bg.random_weights(g)
    models = {}
    for c in (None,) + configs:
        models[c or "shipped"] = executor.load(_compile(g, c), weights,
                                              stream=torch.cuda.current_stream())
    s = bg.LLAMA8B
    batch, cached, new = bg.CASES[CASE]
    x, m, k_cache, v_cache, blocks = bg.layer_inputs(s, batch, cached, new, seed=len(CASE))
    args = (x, m["offs"], blocks, m["clen"], m["lut"], m["maxl"])
    wqkv, wo = bg.torch_weights(weights)
    want = bg.TorchLayer(s, wqkv, wo, bg.freqs_table(s), k_cache.clone(), v_cache.clone())(
        x, cached, new)
    fns, errs = {}, {}
    for name, model in models.items():
        fns[name] = lambda model=model: model.execute(*args)
        for _ in range(6):  # capture, then a graph per staging slot
            (y,) = fns[name]()
        errs[name] = rel_err(torch.from_dlpack(y).clone(), want)
    wall = {n: [] for n in fns}
    for r in range(rounds):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            wall[n].append(wall_ms(fns[n], reps=100))
    print(f"{torch.cuda.get_device_name()}; {CASE}, qkv {SHAPE} at {BUCKET}; {rounds} rounds, "
          f"alternated")
    print(f"{'qkv config':26s} {'wall ms':>8s} {'queued':>8s} {'gap us':>7s} {'qkv us':>7s} "
          f"{'span us':>8s} {'rel err':>8s}  first kernel")
    for n, fn in fns.items():
        gap, first, span, kname = _profile(fn)
        print(f"{n:26s} {statistics.median(wall[n]):8.4f} {event_ms(fn, calls=20):8.4f} "
              f"{gap:7.1f} {first:7.1f} {span:8.1f} {errs[n]:8.1e}  {kname}   walls "
              f"{' '.join(f'{v:.4f}' for v in wall[n])}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5, tuple(sys.argv[2:]) or TRITON)
