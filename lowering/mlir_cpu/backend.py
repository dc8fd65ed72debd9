"""The MLIR CPU backend: one kernel function per plan step, all in one module -> one .so."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlir import ir
from mlir.dialects import func

from graphir.opdef import lookup
from graphir.types import ChainType

from ..plan import build_plan
from ..registry import lowering_for, no_lowering, register_lowering
from . import lowerings  # noqa: F401  (registers the CPU lowerings)
from .lowerings.float8 import legalize_float8
from . import schedules
from .cpu_target import CpuTarget, host_target
from .plan_rules import RUNTIME_OPS, kernel_name
from .plan_rules import symbols as _symbols
from .emit import Emitter, boundary_type, tensor_type
from .toolchain import compile_to_shared_object, new_context



def _runtime_op(e, args):
    raise AssertionError("runtime ops are executed by runtime/cpu_executor.py, never emitted")


for _op in RUNTIME_OPS:
    # Registered so coverage checks see them handled; the plan never emits a kernel for them.
    register_lowering(_op, "cpu")(_runtime_op)


def _load_time_values(graph) -> set[int]:
    """ids of the values the runtime can compute once at load: weights, constants and the
    results of pure, shape-static ops of those (e.g. the concat of q/k/v weights)."""
    known: set[int] = set()
    for n in graph.nodes:
        if n.op in ("weight", "constant"):
            known.update(id(r) for r in n.results)
            continue
        if n.op == "chain" or n.op in RUNTIME_OPS or lookup(n.op).effects or _symbols(n):
            continue
        ins = [v for v in n.operands if not isinstance(v.type, ChainType)]
        # No operands (e.g. the range under a RoPE table): computable once, like a constant.
        if all(id(v) in known for v in ins):
            known.update(id(r) for r in n.results)
    return known


def emit_module(graph, cpu: CpuTarget | None = None):
    """The MLIR module for `cpu` (default: this host's target; in a fresh context) and the
    plan; the context must stay alive.

    Step attrs the executor honours: "at_load" (run once when weights are bound), "prepack"
    ([[operand, layout], ...]: pass that operand packed, see schedules.py)."""
    cpu = cpu or host_target()
    cfg = schedules.MatmulConfig.for_target(cpu)
    plan = build_plan(graph, kernel_name)
    load_time = _load_time_values(graph)
    ctx = new_context()
    with ctx, ir.Location.unknown():
        module = ir.Module.create()
        by_index = {f"k{i}_{n.op}": n for i, n in enumerate(graph.nodes)}
        with ir.InsertionPoint(module.body):
            by_index.update({f"runtime{i}_{n.op}": n for i, n in enumerate(graph.nodes)})
            for step in plan.steps:
                if step.kernel == "view":
                    continue
                node = by_index[step.kernel]
                if step.kernel.startswith("runtime"):
                    step.attrs = {k: v for k, v in node.attrs.items() if isinstance(v, (int, float, str))}
                    continue
                syms = _symbols(node)
                step.attrs["symbols"] = syms
                ins = [v for v in node.operands if not isinstance(v.type, ChainType)]
                outs = [r for r in node.results if not isinstance(r.type, ChainType)]
                if outs and all(id(r) in load_time for r in outs):
                    step.attrs["at_load"] = True
                layouts = schedules.prepack_layouts(node, [id(v) in load_time for v in ins], cfg)
                if layouts:
                    step.attrs["prepack"] = sorted([i, lay] for i, lay in layouts.items())
                _emit_kernel(step.kernel, node, syms, cpu, layouts)
            schedules.apply_matmul_schedule(module, cfg)
    return ctx, module, plan


def _emit_kernel(name: str, node, syms: list[str], cpu: CpuTarget,
                 prepack: dict | None = None) -> None:
    fn = lowering_for(node.op, "cpu")
    if fn is None:
        raise no_lowering(node, "CPU")
    ins = [v.type for v in node.operands if not isinstance(v.type, ChainType)]
    outs = [r.type for r in node.results if not isinstance(r.type, ChainType)]
    arg_types = [boundary_type(t) for t in ins]
    for i, layout in (prepack or {}).items():
        arg_types[i] = schedules.packed_type([int(d) for d in ins[i].shape], layout)
    if syms:
        arg_types.append(ir.RankedTensorType.get([len(syms)], ir.IntegerType.get_signless(64)))
    f = func.FuncOp(name, (arg_types, [tensor_type(t) for t in outs]))
    block = f.add_entry_block()
    with ir.InsertionPoint(block):
        args = list(block.arguments)
        e = Emitter(node, syms, args[-1] if syms else None, cpu)
        e.prepack = dict(prepack or {})
        results = fn(e, args[:len(ins)])
        func.ReturnOp(results)
    # LLVM cannot lower f8 extf/truncf: any kernel touching float8 gets them as integer ops.
    legalize_float8(f.operation)


def _cpu_of(target) -> CpuTarget:
    """The CpuTarget of a driver Target (`cpu` alone: this host's)."""
    spec = getattr(target, "cpu", None)
    return CpuTarget.parse(spec) if spec else host_target()


def build(graph, target, say, **options):
    cpu = _cpu_of(target)
    say("emitting MLIR")
    ctx, module, plan = emit_module(graph, cpu)
    with ctx:
        say("compiling to native code")
        with tempfile.TemporaryDirectory(prefix="graphir-cpu-") as tmp:
            so = compile_to_shared_object(module, Path(tmp) / "kernels.so", target=cpu,
                                          abi=kernel_abi(plan))
            data = so.read_bytes()
    kernels = sorted({s.kernel for s in plan.steps if s.kernel[0] == "k"})
    cfg = schedules.MatmulConfig.for_target(cpu)
    record = dict(cpu.record(), matmul_block=[cfg.mr, cfg.nr])
    return {"cpu/kernels.so": data}, {"plan": plan.to_json(), "kernels": kernels,
                                      "library": "cpu/kernels.so", "cpu": record}


def kernel_abi(plan) -> str:
    """What the kernels of `plan` were compiled to expect beyond the graph: the operands each
    takes pre-packed, and in which layout. The library returns it (runtime/cpu.py
    `CpuLibrary.abi`) and the executor holds the manifest's steps to it: a step that lost or
    changed its "prepack" would pass a kernel the wrong bytes, which no digest of the manifest
    alone can catch once the manifest is rewritten consistently."""
    return json.dumps({s.kernel: s.attrs["prepack"] for s in plan.steps
                       if s.attrs.get("prepack")}, sort_keys=True)


def mlir_text(graph, stage: str = "mlir", target=None) -> str:
    """The module at a toolchain stage (for `graphir dump --stage mlir|llvm`)."""
    from .toolchain import stage_text

    cpu = _cpu_of(target)
    ctx, module, _ = emit_module(graph, cpu)
    with ctx:
        return stage_text(module, stage, cpu)
