"""For the layer A/B sweeps (matmul_choice_ab.py, qkv_choice_ab.py, rope_decode_ab.py; the GEMV
preload's A/B of 2026-12-07 is in git history, commit 28b56fb): the layer of tools/bench_gpu.py
compiled from the shipped tuning table with some matmul entries replaced (compile_with) or with
a lowering switch set (compile_switched), each build loaded in one process, checked against
torch eager, and timed in alternated rounds of synchronized steps."""
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
from graphir.tools.gpu_timing import rel_err, wall_ms  # noqa: E402


def compile_with(g, entries: dict[tuple[str, str], str]):
    """The layer's artifact from the shipped table with matmul entries {(shape key, bucket):
    config} replaced (bf16)."""
    from graphir.lowering.driver import compile_graph
    from graphir.lowering.triton_gpu import tuning

    shipped = tuning.DEFAULTS_PATH
    if not entries:
        return compile_graph(g, "cuda:sm_90")
    table = copy.deepcopy(json.loads(shipped.read_text()))
    for (shape, bucket), cfg in entries.items():
        table["families"]["matmul"]["bf16"][shape][bucket] = cfg
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "table.json"
        p.write_text(json.dumps(table))
        tuning.DEFAULTS_PATH = p      # read by the compile's Selector and its cache key
        try:
            return compile_graph(g, "cuda:sm_90")
        finally:
            tuning.DEFAULTS_PATH = shipped


def compile_switched(module, attr: str):
    """A `compile` for load_variants whose variants are values of `module.attr` (a lowering
    switch), each compiled with it set into a file of its own: the cache key does not see the
    switch, so through the cache every variant would share one entry (the first build's,
    before compile_graph's use_cache=False replaced entries; each recompile's since), and the
    user's cache would keep a variant's build under the shipped key."""
    def build(g, value):
        from graphir.lowering.driver import compile_graph

        old = getattr(module, attr)
        setattr(module, attr, value)
        try:
            out = Path(tempfile.mkdtemp()) / f"{attr}_{value}.gart"
            return compile_graph(g, "cuda:sm_90", out=out)
        finally:
            setattr(module, attr, old)
    return build


def load_variants(case: str, variants: dict, compile=None,
                  setup=None) -> tuple[dict, dict, dict]:
    """{name: step function}, {name: rel err vs torch eager}, {name: output} of the layer
    built per variant ({name: what `compile(graph, it)` takes; default compile_with's
    entries}) on `case`'s inputs; each model has run six steps (capture, then a graph per
    staging slot). `setup(name, model)`, if given, runs on each model before its first step
    (a runtime switch)."""
    from graphir.examples.llama_attention import build
    from graphir.runtime.cuda import executor

    g = build()
    weights = bg.random_weights(g)
    compile = compile or compile_with
    models = {n: executor.load(compile(g, e), weights, stream=torch.cuda.current_stream())
              for n, e in variants.items()}
    s = bg.LLAMA8B
    batch, cached, new = bg.CASES[case]
    x, m, k_cache, v_cache, blocks = bg.layer_inputs(s, batch, cached, new, seed=len(case))
    args = (x, m["offs"], blocks, m["clen"], m["lut"], m["maxl"])
    wqkv, wo = bg.torch_weights(weights)
    want = bg.TorchLayer(s, wqkv, wo, bg.freqs_table(s), k_cache.clone(), v_cache.clone())(
        x, cached, new)
    fns, errs, outs = {}, {}, {}
    for name, model in models.items():
        if setup is not None:
            setup(name, model)
        fns[name] = lambda model=model: model.execute(*args)
        for _ in range(6):
            (y,) = fns[name]()
        outs[name] = torch.from_dlpack(y).clone()
        errs[name] = rel_err(outs[name], want)
    return fns, errs, outs


def alternated_walls(fns: dict, rounds: int, reps: int = 100) -> dict[str, list[float]]:
    """Wall ms a synchronized step, median of `reps` calls, per round; the order of the
    variants reversed every other round."""
    wall = {n: [] for n in fns}
    for r in range(rounds):
        for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            wall[n].append(wall_ms(fns[n], reps=reps))
    return wall


def step_events(fn, steps: int, sync: bool = False) -> list[list]:
    """The device events (kernels, copies) of `steps` profiled calls of fn (CUPTI via
    torch.profiler), in start order, split per step; steps queued back to back or, with
    `sync`, each synchronized before the next."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
            if sync:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                  and e.device_time_total > 0), key=lambda e: e.time_range.start)
    per = len(evs) // steps
    return [evs[s * per:(s + 1) * per] for s in range(steps)]


def kernel_times(fn, steps: int = 30, sync: bool = True) -> tuple[list[tuple[str, float]], float]:
    """[(kernel, median us)] in step order (the upload first) and the median step span (first
    kernel start to last kernel end, the upload excluded)."""
    events = step_events(fn, steps, sync)
    durs, spans = [[] for _ in events[0]], []
    for step in events:
        ks = [e for e in step if "Memcpy" not in e.name and "upload_staged" not in e.name]
        spans.append(ks[-1].time_range.end - ks[0].time_range.start)
        for i, e in enumerate(step[:len(durs)]):
            durs[i].append(e.time_range.end - e.time_range.start)
    names = [e.name[:28] for e in events[0]]
    return [(n, statistics.median(d)) for n, d in zip(names, durs)], statistics.median(spans)


def report(fns: dict, errs: dict, wall: dict, width: int = 26) -> None:
    """Per variant: the median wall of its rounds, its step span and rel err, then each
    kernel's time."""
    for n, fn in fns.items():
        ks, span = kernel_times(fn)
        print(f"{n:{width}s} wall {statistics.median(wall[n]) * 1e3:6.1f} us  span {span:5.1f} "
              f"us  rel err {errs[n]:.1e}  walls {' '.join(f'{v * 1e3:.1f}' for v in wall[n])}")
        print("   " + ", ".join(f"{k} {t:.1f}" for k, t in ks))
