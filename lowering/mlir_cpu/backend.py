"""The MLIR CPU backend: one kernel function per plan step, all in one module -> one .so."""
from __future__ import annotations

import tempfile
from pathlib import Path

from mlir import ir
from mlir.dialects import func

from graphir.dim import Dim
from graphir.types import BufferType, ChainType

from ..plan import build_plan
from ..registry import lowering_for
from . import lowerings  # noqa: F401  (registers the CPU lowerings)
from .emit import Emitter, boundary_type, tensor_type
from .toolchain import compile_to_shared_object, new_context

# Ops the CPU runtime carries out itself (no kernel): collectives and copies between the
# in-process virtual devices.
RUNTIME_OPS = {"allreduce", "allgather", "transfer_to"}


def _symbols(node) -> list[str]:
    syms: set[str] = set()
    for v in list(node.operands) + list(node.results):
        if not isinstance(v.type, ChainType):
            for d in v.type.shape:
                syms |= d.symbols
    for a in node.attrs.values():
        for d in (a if isinstance(a, (list, tuple)) else [a]):
            if isinstance(d, Dim):
                syms |= d.symbols
    return sorted(syms)


def kernel_name(node, index: int) -> str:
    return f"{'runtime' if node.op in RUNTIME_OPS else 'k'}{index}_{node.op}"


def emit_module(graph):
    """The MLIR module (in a fresh context) and the plan; the context must stay alive."""
    plan = build_plan(graph, kernel_name)
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
                _emit_kernel(step.kernel, node, syms)
    return ctx, module, plan


def _emit_kernel(name: str, node, syms: list[str]) -> None:
    fn = lowering_for(node.op, "cpu")
    if fn is None:
        raise NotImplementedError(f"gir.{node.op} has no CPU lowering")
    ins = [v.type for v in node.operands if not isinstance(v.type, ChainType)]
    outs = [r.type for r in node.results if not isinstance(r.type, ChainType)]
    arg_types = [boundary_type(t) for t in ins]
    if syms:
        arg_types.append(ir.RankedTensorType.get([len(syms)], ir.IntegerType.get_signless(64)))
    f = func.FuncOp(name, (arg_types, [tensor_type(t) for t in outs]))
    block = f.add_entry_block()
    with ir.InsertionPoint(block):
        args = list(block.arguments)
        e = Emitter(node, syms, args[-1] if syms else None)
        results = fn(e, args[:len(ins)])
        func.ReturnOp(results)


def build(graph, target, say, **options):
    say("emitting MLIR")
    ctx, module, plan = emit_module(graph)
    with ctx:
        say("compiling to native code")
        with tempfile.TemporaryDirectory(prefix="graphir-cpu-") as tmp:
            so = compile_to_shared_object(module, Path(tmp) / "kernels.so")
            data = so.read_bytes()
    kernels = sorted({s.kernel for s in plan.steps if s.kernel[0] == "k"})
    return {"cpu/kernels.so": data}, {"plan": plan.to_json(), "kernels": kernels,
                                      "library": "cpu/kernels.so"}


def mlir_text(graph, stage: str = "mlir") -> str:
    """The module at a toolchain stage (for `graphir dump --stage mlir|llvm`)."""
    from .toolchain import stage_text

    ctx, module, _ = emit_module(graph)
    with ctx:
        return stage_text(module, stage)
