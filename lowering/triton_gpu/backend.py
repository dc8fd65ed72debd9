"""The Triton GPU backend: graph -> execution plan of kernel launches + offline cubins.

`lower(graph)` (no compiler involved) forms the plan: nodes computable from constants and
weights alone run once on the host when the model loads ("host" steps: the RoPE table, the
stacked qkv weight); elementwise chains become fused groups (codegen.py); every other node goes
to its registered lowering (lowerings/, one module per op family), which records launches as
data (lowerings/base.py).
`build(graph, target, say)` then compiles every distinct kernel specialization with
`triton.compile` for the target (no GPU needed) and returns the artifact payload (cubins, PTX,
Triton sources) and the manifest fields: the plan, the kernel table (cubin file, parameters,
warps, shared memory, scratch sizes; a cuBLASLt entry names its Triton fallback instead) and
the "tuning" section. Tunable steps (the matmul) take their configs per shape bucket from
tuning.py: the shipped table, or with `tune=True` timings on this machine's GPU.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import networkx as nx
import numpy as np

from graphir.passes.elementwise_fusion import find_groups
from graphir.types import ChainType
from graphir.lowering.plan import Plan, Step, assign_slots, host_nodes, value_table
from graphir.lowering.registry import lowering_for, no_lowering

from . import codegen, lowerings  # noqa: F401  (register the lowerings)
from .lowerings.base import Program, StepBuilder

STRUCTURAL = ("chain", "weight", "constant")


def schedule(graph, groups, host: set[int]) -> list:
    """Device units (a Node or a FusionGroup) in a dependency order close to graph order."""
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    unit_of: dict[int, object] = {}
    units = []
    for g in groups:
        units.append(g)
        for n in g.nodes:
            unit_of[id(n)] = g
    for n in graph.nodes:
        if id(n) not in unit_of and id(n) not in host and n.op != "chain":
            units.append(n)
            unit_of[id(n)] = n
    producer = {id(r): n for n in graph.nodes for r in n.results}
    dag = nx.DiGraph()
    pos = {}
    for u in units:
        members = u.nodes if hasattr(u, "nodes") else [u]
        pos[id(u)] = max(index[id(m)] for m in members)
        dag.add_node(id(u))
        for m in members:
            for v in m.operands:
                p = producer.get(id(v))
                src = unit_of.get(id(p)) if p is not None else None
                if src is not None and src is not u:
                    dag.add_edge(id(src), id(u))
    by_id = {id(u): u for u in units}
    order = nx.lexicographical_topological_sort(dag, key=lambda k: pos[k])
    return [by_id[k] for k in order]


def lower(graph) -> Program:
    """The plan and kernel specializations of `graph` (no compilation)."""
    host = host_nodes(graph)
    groups = find_groups(graph, exclude=host)
    vids, infos = value_table(graph)
    constants = {}
    for n in graph.nodes:
        if id(n) in host and n.op not in STRUCTURAL:
            for r in n.results:
                infos[vids[id(r)]].kind = "host"
        if n.op == "constant" and np.asarray(n.attrs["value"]).size == 1:
            constants[id(n.results[0])] = n.attrs["value"]
    program = Program(plan=None, infos=infos)
    node_index = {id(n): i for i, n in enumerate(graph.nodes)}
    steps: list[Step] = []
    for i, n in enumerate(graph.nodes):
        if id(n) in host and n.op not in STRUCTURAL:
            steps.append(Step("host", n.op, [vids[id(v)] for v in n.operands],
                              [vids[id(r)] for r in n.results], {"node": i}))
    for unit in schedule(graph, groups, host):
        if hasattr(unit, "nodes"):
            sb = StepBuilder(program, vids, "fused:" + ",".join(m.op for m in unit.nodes),
                             unit.inputs, unit.outputs, constants)
            codegen.lower_group(sb, unit)
            steps.append(sb.step())
            continue
        n = unit
        ins = [v for v in n.operands if not isinstance(v.type, ChainType)]
        outs = [r for r in n.results if not isinstance(r.type, ChainType)]
        if n.op == "reshape" and infos[vids[id(outs[0])]].kind == "intermediate":
            infos[vids[id(outs[0])]].view_of = vids[id(ins[0])]
            steps.append(Step("view", n.op, [vids[id(ins[0])]], [vids[id(outs[0])]]))
            continue
        fn = lowering_for(n.op, "cuda")
        if fn is None:
            raise no_lowering(n, "cuda")
        sb = StepBuilder(program, vids, n.op, ins, outs, constants)
        try:
            fn(sb, n)
        except ValueError as err:
            raise ValueError(f"{err}{' (at ' + n.loc + ')' if n.loc else ''}") from None
        if getattr(sb, "collective", None) is not None:
            steps.append(Step("collective", n.op, sb.inputs, sb.outputs, sb.collective))
        elif getattr(sb, "host_fallback", False):
            steps.append(Step("host_runtime", n.op, sb.inputs, sb.outputs,
                              {"node": node_index[id(n)]}))
        else:
            steps.append(sb.step())
    n_slots = assign_slots(infos, [s for s in steps if s.kernel != "host"])
    inputs = [vids[id(v)] for v in graph.inputs if not isinstance(v.type, ChainType)]
    program.plan = Plan(infos, steps, inputs, [vids[id(v)] for v in graph.outputs], n_slots)
    return program


def kernel_source(spec, program: Program, key: str) -> str:
    """Triton source of a kernel: the generated text, or the hand-written kernel's module."""
    if key in program.sources:
        return program.sources[key]
    fn = getattr(spec.fn, "fn", spec.fn)
    head = (f"# {key}: {spec.name}, constexprs {json.dumps(_jsonable(spec.constexprs))}, "
            f"num_warps {spec.num_warps}, num_stages {spec.num_stages}\n")
    try:
        return head + Path(inspect.getsourcefile(fn)).read_text()
    except (TypeError, OSError):
        return head


def _jsonable(d) -> dict:
    return {k: (v if isinstance(v, (bool, int, float, str)) else repr(v)) for k, v in d.items()}


def build(graph, target, say=lambda msg: None, *, tune: bool = False, **options):
    """Compile `graph` for `target` (a lowering.driver.Target, cuda): (payload, manifest extra).

    tune=True times every candidate config of every tunable kernel step on this machine's GPU
    (lowering/triton_gpu/tuning.py) and compiles the winners; without a usable GPU it warns and
    uses the shipped default table. The manifest's "tuning" section records the choices.
    """
    if options:
        raise ValueError(f"unknown cuda compile options {sorted(options)}; known: ['tune']")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _build_in_subprocess(graph, target, say, tune)
    from triton.backends.compiler import GPUTarget

    from . import tuning
    from .aot import MAX_SHARED_SM90, compile_spec
    from .kernels.upload import UPLOAD_KEY, upload_spec

    say("lowering to Triton kernels")
    selector = tuning.Selector()
    with tuning.using(selector):
        program = lower(graph)
    gpu = GPUTarget("cuda", int(target.arch or 90), 32)
    section = {"requested": bool(tune)}
    compiled: dict = {}
    if tune and selector.sites:
        program, selector, section, compiled = _tune(graph, program, selector, gpu, say)
    # Not a plan step's: the runtime's slot graphs lead with it (kernels/upload.py).
    program.kernels[UPLOAD_KEY] = upload_spec()
    compiled.update(_precompile({k: s for k, s in program.kernels.items()
                                 if s.extra.get("kind") != "cublaslt" and k not in compiled},
                                gpu.arch, say))
    payload: dict[str, bytes] = {}
    table = {}
    for i, (key, spec) in enumerate(sorted(program.kernels.items())):
        if spec.extra.get("kind") == "cublaslt":
            table[key] = _library_entry(spec)
            continue
        say(f"compiling kernel {i + 1}/{len(program.kernels)}: {spec.name}")
        c = compiled.get(key) or compile_spec(spec, gpu)
        if c.shared > MAX_SHARED_SM90:
            raise ValueError(f"kernel {key} needs {c.shared} bytes of shared memory, over the "
                             f"sm_90 limit of {MAX_SHARED_SM90}")
        payload[f"cuda/{key}.cubin"] = c.cubin
        payload[f"cuda/{key}.ptx"] = c.ptx.encode()
        payload[f"triton/{key}.py"] = kernel_source(spec, program, key).encode()
        table[key] = {**c.launch_metadata(), "cubin": f"cuda/{key}.cubin",
                      "ptx": f"cuda/{key}.ptx", "source": f"triton/{key}.py",
                      "spec": spec.name, "signature": dict(spec.signature),
                      "constexprs": _jsonable(spec.constexprs),
                      "divisible_by_16": list(spec.divisible_by_16)}
    extra = {"backend": "triton_gpu", "plan": program.plan.to_json(), "kernels": table,
             "input_names": graph.input_names,
             "tuning": tuning.manifest_section(selector, **section)}
    return payload, extra


# Fewer kernels than this compile one by one in this process: starting the worker processes
# (each imports Triton) costs about what two or three cold kernel compiles do.
PARALLEL_MIN = 8


def compile_workers() -> int:
    """Worker processes for a build's kernel compiles: GRAPHIR_COMPILE_WORKERS, else one a
    core (at most 16); 1 compiles in this process."""
    env = os.environ.get("GRAPHIR_COMPILE_WORKERS", "")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"GRAPHIR_COMPILE_WORKERS must be a positive integer, got "
                             f"{env!r}") from None
        if n < 1:
            raise ValueError(f"GRAPHIR_COMPILE_WORKERS must be a positive integer, got {n}")
        return n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cores or 1, 16)


def _precompile(specs: dict, arch, say) -> dict:
    """{key: cubin} of the hand-written kernels among `specs` compiled in parallel worker
    processes, when there are enough of them, more than one worker and a first one compiled
    here missed Triton's cache; the rest (and any whose compile failed there, so that its error
    is raised here, in context) compile one by one in build's loop. Kernels generated at build
    time stay here too: their module is this process's."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    from .aot import compile_spec
    from .tuning_gpu import compile_specs

    workers = compile_workers()
    mine = {k: s for k, s in sorted(specs.items())
            if getattr(getattr(s.fn, "fn", s.fn), "__module__", "").startswith("graphir.")}
    if workers < 2 or len(mine) < PARALLEL_MIN:
        return {}
    # A first kernel found in Triton's cache (or in this process's memory: no compile at all)
    # means a warm build: the rest compile here too (workers would only add their start-up).
    key = next(iter(mine))
    hits = []
    prev = knobs.compilation.listener
    knobs.compilation.listener = lambda **kw: hits.append(kw.get("cache_hit"))
    try:
        out = {key: compile_spec(mine.pop(key), GPUTarget("cuda", int(arch), 32))}
    finally:
        knobs.compilation.listener = prev
    if not hits or hits[-1]:
        return out
    say(f"compiling {len(mine)} kernels in {min(workers, len(mine))} processes")
    done = compile_specs(mine, int(arch), workers, desc="compile kernels")
    return {**out, **{k: c for k, c in done.items() if not isinstance(c, Exception)}}


def _tune(graph, program, selector, gpu, say):
    """Time the candidates on this machine's GPU and lower again with the winners:
    (program, selector, manifest-section facts, compiled cubins by kernel key)."""
    import warnings

    from . import tuning
    from .tuning_gpu import GpuMeasurer, unavailable_reason

    why = unavailable_reason(gpu)
    if why:
        note = (f"--tune needs a CUDA GPU of the target's architecture ({why}); using the "
                f"shipped default table {tuning.DEFAULTS_PATH.name} instead")
        warnings.warn(note, RuntimeWarning)
        say(note)
        return program, selector, {"requested": True, "tuned": False, "note": note}, {}
    measure = GpuMeasurer(gpu, say=say)
    measured = tuning.tune(selector.sites, measure, measure.device_name, say)
    tuned = tuning.Selector([("tuned", measured)] + selector.tables)
    with tuning.using(tuned):
        program = lower(graph)
    return program, tuned, {"requested": True, "tuned": True,
                            "device": measure.device_name}, measure.compiled


def _library_entry(spec) -> dict:
    """Kernel-table entry of a library call (no cubin): what `_Kernels` needs to build it."""
    ex = dict(spec.extra)
    params = [{"name": n, "type": t} for n, t in spec.runtime_params()]
    return {"kind": ex.pop("kind"), "name": spec.name, "spec": spec.name, "params": params,
            "signature": dict(spec.signature), "num_warps": 0, "shared": 0, **ex}


def _build_in_subprocess(graph, target, say, tune=False):
    # Under TRITON_INTERPRET=1 (the interpreter tests) @triton.jit functions cannot be
    # compiled; build in a clean interpreter instead.
    say("compiling in a subprocess (TRITON_INTERPRET is set here)")
    with tempfile.TemporaryDirectory(prefix="graphir-build-") as tmp:
        src = Path(tmp) / "graph.gir"
        src.write_text(str(graph))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        argv = [sys.executable, "-m", "graphir.lowering.triton_gpu.backend", str(src),
                str(target), tmp] + (["--tune"] if tune else [])
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"cuda build subprocess failed:\n{proc.stderr[-4000:]}")
        extra = json.loads((Path(tmp) / "extra.json").read_text())
        if extra.get("tuning", {}).get("note"):
            say(extra["tuning"]["note"])
        payload = {}
        for rel in extra.pop("_files"):
            payload[rel] = (Path(tmp) / "out" / rel).read_bytes()
    return payload, extra


def _main(argv) -> int:
    from graphir import parse
    from graphir.lowering.driver import Target

    tune = "--tune" in argv
    src, target, out = [a for a in argv if a != "--tune"]
    graph = parse(Path(src).read_text())
    payload, extra = build(graph, Target.parse(target), tune=tune)
    for rel, data in payload.items():
        p = Path(out) / "out" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (Path(out) / "extra.json").write_text(json.dumps({**extra, "_files": sorted(payload)}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
