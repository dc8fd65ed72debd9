"""`graphir demo`: the main job, end to end on the CPU (or a GPU).

Builds the Llama-style attention layer of examples/llama_attention.py, runs the passes, compiles
it for the CPU, loads the artifact, runs a ragged prefill of three sequences and decode steps
through the paged KV cache, and checks every step (outputs and the whole cache) against the
reference interpreter, printing the time of each stage.

`--device gpu` does the same on an NVIDIA GPU (cubins compiled offline, run by runtime.cuda).
Anything that keeps the layer from compiling is an error: the demo never says OK without
having run compiled code.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from graphir import progress
from graphir.device import DeviceRef
from graphir.dtype import DType

from . import numerics

SIZES = {"tiny": ("build_tiny", "f32", "5,3,7"), "8b": ("build", "bf16", "40,17,71")}
# On the GPU the default dtype is bf16 (the kernels' f32 dot is tf32, outside f32 tolerances).
GPU_DTYPE = "bf16"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="tiny: hidden 64, 4 heads (default); 8b: Llama-3-8B's layer (hidden 4096, "
                        "32 heads, 8 KV heads, head dim 128)")
    p.add_argument("--dtype", choices=["f32", "bf16"], help="default: f32 for tiny, bf16 for 8b")
    p.add_argument("--prefill", metavar="N,N,N", help="new tokens of each sequence in the prefill "
                                                       "(default 5,3,7 tiny; 40,17,71 8b)")
    p.add_argument("--decode-steps", type=int, default=3, help="decode steps after the prefill (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and cache (default 0)")
    p.add_argument("--no-cache", action="store_true", help="compile even if the compile cache has it")


@dataclass
class Report:
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    errors: list[tuple[str, float, bool]] = field(default_factory=list)

    def stage(self, name: str, seconds: float, note: str = "") -> None:
        self.rows.append((name, seconds, note))

    @property
    def ok(self) -> bool:
        return bool(self.errors) and all(good for _, _, good in self.errors)

    def print(self) -> None:
        print(f"{'stage':<9}{'time':>12}  note")
        for name, s, note in self.rows:
            t = f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"
            print(f"{name:<9}{t:>12}  {note}")


def cpu_gaps(graph) -> list[str]:
    """Ops of `graph` (after the default passes and decompositions) without a CPU lowering."""
    from graphir import parse
    from graphir.passes import run_passes
    from graphir.lowering.driver import decompose
    from graphir.lowering.plan import VIEW_OPS
    from graphir.lowering.registry import lowering_for

    from graphir.optional import require

    require("mlir", "the CPU demo (MLIR)")
    from graphir.lowering.mlir_cpu.backend import RUNTIME_OPS  # registers the CPU lowerings
    g = parse(str(graph))
    run_passes(g)
    decompose(g, "cpu")
    skip = {"chain", "weight", "constant"} | RUNTIME_OPS | VIEW_OPS
    return sorted({n.op for n in g.nodes if n.op not in skip and lowering_for(n.op, "cpu") is None})


def _example(name: str):
    import importlib

    return importlib.import_module(f"graphir.examples.{name}")


def _build(args):
    llama_attention = _example("llama_attention")
    fn_name, default_dt, _ = SIZES[args.size]
    if getattr(args, "device", "cpu") == "gpu" and not args.dtype:
        default_dt = GPU_DTYPE
    dtype = {"f32": DType.float32, "bf16": DType.bfloat16}[args.dtype or default_dt]
    fn = getattr(llama_attention, fn_name)
    return fn, dtype


def _kv_params(graph) -> dict:
    """num_layers, page_size, n_kv_heads, head_dim from the kv_blocks input type."""
    shape = [int(d) for d in graph.inputs[2].type.shape[2:]]
    return dict(zip(("num_layers", "page_size", "n_kv_heads", "head_dim"), shape))


def _compile_and_load(graph, weights, args, report: Report) -> Callable:
    from graphir.lowering.artifact import load_artifact
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.session import InferenceSession

    from .compile_cmd import StageTimer, stage_stream

    timer = StageTimer(stage_stream(args.quiet), prefix="compile")
    target = "cpu" if args.device == "cpu" else "cuda:sm_90"
    try:
        art = compile_graph(graph, target, use_cache=not args.no_cache, progress=timer)
    finally:
        timer.finish()
    detail = "cache hit" if timer.cache_hit else ", ".join(
        f"{m} {s:.2f} s" for m, s in timer.stages if m != "running passes")
    report.stage("compile", timer.total, f"{art.path.name} ({detail})")
    t0 = time.perf_counter()
    opened = load_artifact(art.path)  # from disk, as a new process would: every hash verified
    t_open = time.perf_counter() - t0
    devices = [DeviceRef.CPU()] if args.device == "cpu" else [DeviceRef.GPU()]
    model = InferenceSession(devices).load(opened, weights=weights)
    t_load = time.perf_counter() - t0
    report.stage("load", t_load, f"{len(art.manifest['kernels'])} kernels; artifact verified "
                                 f"{t_open * 1e3:.1f} ms, .so opened + weights bound "
                                 f"{(t_load - t_open) * 1e3:.1f} ms")
    return model.execute


def run_steps(graph, candidate: Callable, weights, batches: list[tuple[str, list[int]]],
              rng: np.random.Generator, report: Report) -> None:
    """Prefill/decode through the paged cache: candidate vs the interpreter, every step."""
    from graphir.runtime.interpreter import run
    from graphir.runtime.kv_cache import PagedKVCacheManager

    kv = _kv_params(graph)
    hidden = int(graph.inputs[0].type.shape[1])
    dtype = graph.outputs[0].type.dtype
    cache_dt = graph.inputs[2].type.dtype
    lengths = np.sum([counts for _, counts in batches], axis=0)
    pages = int(sum(-(-int(n) // kv["page_size"]) for n in lengths)) + 2
    mgr = PagedKVCacheManager(**kv, total_num_pages=pages, dtype=np.float32)
    # Random (not zero) blocks: a kernel writing the wrong page or layer shows up in the check.
    mgr.blocks = numerics.random_array(rng, cache_dt, mgr.blocks_shape)
    seqs = [mgr.claim() for _ in batches[0][1]]
    times: dict[str, list[tuple[float, float]]] = {}
    for kind, counts in progress.iterate(batches, desc="run + check", unit="step"):
        step = mgr.prepare_step(seqs, counts)
        x = numerics.random_array(rng, dtype, (sum(counts), hidden))
        rest = [step.cache_lengths, step.lookup_table, step.max_lengths]
        ref_blocks = mgr.blocks.copy()
        t0 = time.perf_counter()
        (got,) = candidate(x, step.input_row_offsets, mgr.blocks, *rest)
        t_cand = time.perf_counter() - t0
        t0 = time.perf_counter()
        (want,) = run(graph, x, step.input_row_offsets, ref_blocks, *rest, weights=weights)
        t_ref = time.perf_counter() - t0
        mgr.commit_step(step)
        times.setdefault(kind, []).append((t_cand, t_ref))
        n = len(times[kind])
        for what, g, w, dt in ((f"{kind} {n} output", got, want, dtype),
                               (f"{kind} {n} kv cache", mgr.blocks, ref_blocks, cache_dt)):
            err, good = numerics.compare(g, w, dt)
            report.errors.append((what, err, good))
            if not good:
                print(f"MISMATCH in {what}: max rel err {err:.2e} "
                      f"(tolerance {numerics.REL_TOL.get(dt, 0):.0e})")
    for kind, ts in times.items():
        cand, ref = np.mean([t for t, _ in ts]), np.mean([r for _, r in ts])
        toks = [c for k, c in batches if k == kind]
        note = (f"{len(toks[0])} sequences, {'+'.join(map(str, toks[0]))} tokens" if kind == "prefill"
                else f"per step (mean of {len(ts)}), {len(toks[0])} sequences x 1 token")
        report.stage(kind, cand, f"{note}; interpreter {ref * 1e3:.1f} ms")
    print(f"kv cache: {', '.join(str(mgr.cache_length(s)) for s in seqs)} tokens cached in "
          f"{mgr.used_pages} pages of {kv['page_size']} (layer {_layer(graph)} of {kv['num_layers']})")


def _layer(graph) -> str:
    layers = {n.attrs["layer"] for n in graph.nodes if "layer" in n.attrs}
    return ", ".join(map(str, sorted(layers))) or "?"


def condensed_ir(graph, limit: int = 160) -> str:
    """The IR with long constant payloads elided (the RoPE table is thousands of numbers)."""
    lines = []
    for ln in str(graph).splitlines():
        if len(ln) > limit and "dense<" in ln:
            head, _, rest = ln.partition("dense<")
            shape, _, rest = rest.partition(" : [")
            ln = f"{head}dense<{shape} : [...]>{rest[rest.index(']>') + 2:]}"
        lines.append(ln)
    return "\n".join(lines)


def _candidate(graph, weights, args, report: Report) -> tuple[Callable, str]:
    """The compiled layer for the demo's device; anything that keeps it from compiling is an
    error (the demo never reports OK without having run compiled code)."""
    if args.device == "cpu":
        gaps = cpu_gaps(graph)
        if gaps:
            raise ValueError(f"demo: the CPU backend cannot compile this layer: no lowering for "
                             f"{', '.join(gaps)}")
    return _compile_and_load(graph, weights, args, report), f"compiled {args.device.upper()} code"


def _parse_prefill(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--prefill expects comma-separated token counts, got {text!r}") from None
    if not counts or min(counts) <= 0:
        raise ValueError(f"--prefill: token counts must be positive, got {text!r}")
    return counts


def demo(args) -> int:
    from graphir import parse
    from graphir.passes import run_passes

    args.device = getattr(args, "device", "cpu")
    if args.device not in ("cpu", "gpu"):
        raise ValueError(f"demo: --device must be cpu or gpu, got {args.device!r}")
    if args.device == "gpu":
        from graphir.runtime.cuda import driver

        if driver.device_count() == 0:
            raise ValueError("demo --device gpu: no CUDA GPU here; run `graphir demo` for the CPU")
    if args.decode_steps < 0:
        raise ValueError(f"--decode-steps must be >= 0, got {args.decode_steps}")
    prefill = _parse_prefill(args.prefill or SIZES[args.size][2])
    batches = [("prefill", prefill)] + [("decode", [1] * len(prefill))] * args.decode_steps
    rng = np.random.default_rng(args.seed)
    report = Report()

    build_fn, dtype = _build(args)
    t0 = time.perf_counter()
    graph = build_fn(dtype=dtype)
    report.stage("build", time.perf_counter() - t0, f"@{graph.name}: {len(graph.nodes)} ops, {dtype.short}")
    t0 = time.perf_counter()
    opt = parse(str(graph))
    run_passes(opt)
    ops_after = [n.op for n in opt.nodes if n.op not in ("chain", "weight", "constant")]
    report.stage("passes", time.perf_counter() - t0, f"{len(opt.nodes)} ops: {', '.join(ops_after)}")
    if not args.quiet:
        print(f"== @{graph.name} after the default passes ==")
        print(condensed_ir(opt))
    weights = numerics.random_weights(graph, rng)

    candidate, label = _candidate(graph, weights, args, report)
    run_steps(graph, candidate, weights, batches, rng, report)
    report.print()
    worst = max(err for _, err, _ in report.errors)
    print(f"checked {len(report.errors)} results ({len(batches)} steps: outputs and the whole KV "
          f"cache) of the {label} against the interpreter: max rel err {worst:.2e}")
    print(f"demo: {'OK' if report.ok else 'MISMATCH'}")
    return 0 if report.ok else 1
