"""MLIR -> LLVM -> shared object, on top of the upstream MLIR Python bindings.

The input is a module of func.func ops over tensors (linalg, tensor, arith, math, scf, memref,
vector, optionally a transform-dialect schedule, see schedules.py). The stages are:

    mlir        the module as given
    scheduled   after the transform-dialect schedule (if any) ran and was erased
    bufferized  one-shot-bufferize, results turned into out-params, deallocation inserted
    llvm        the LLVM dialect
    llvmir      LLVM IR text

Calling convention of the compiled code: every public function gets `llvm.emit_c_interface`, so
the object exports `_mlir_ciface_<name>(in descriptors..., out descriptors...)` where each
descriptor is a pointer to a ranked memref struct and every tensor result became a trailing
out-param (identity layout, i.e. C-contiguous). runtime/cpu.py calls that without MLIR.

Code generation follows a CpuTarget (cpu_target.py; the host's when none is given): every
llvm.func gets LLVM's target-cpu / target-features attributes (the -mcpu / -mattr of the
ExecutionEngine's host-configured machine are overridden per function; outlined OpenMP bodies
inherit them), so a library built for avx2 holds no AVX-512 instruction even on an AVX-512 host.

Parallel loops (scf.forall / scf.parallel) become OpenMP regions; parallel_runtime.c implements
the few __kmpc_* functions they call, and is linked into every .so with hidden visibility.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from mlir import ir, passmanager
from mlir.execution_engine import ExecutionEngine

from .cpu_target import CpuTarget, host_target

STAGES = ("mlir", "scheduled", "bufferized", "llvm", "llvmir")

_RUNTIME_C = Path(__file__).with_name("parallel_runtime.c")
_runtime_lock = threading.Lock()

BUFFERIZE_PIPELINE = (
    "one-shot-bufferize{bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map unknown-type-conversion=identity-layout-map}",
    "canonicalize",
    # Without this the caller never sees results: tensors returned by public functions become
    # caller-allocated out-params; hoist-static-allocs writes straight into them.
    "buffer-results-to-out-params{modify-public-functions hoist-static-allocs hoist-dynamic-allocs}",
    "buffer-deallocation-pipeline",
    "canonicalize",
)

# To OpenMP first; the work-sharing loops then get the dynamic schedule (see _dynamic_loops).
OPENMP_PIPELINE = (
    "convert-linalg-to-loops",
    # bf16 <-> f32 as integer ops: LLVM would otherwise call compiler-rt's __truncsfbf2.
    "arith-expand{include-bf16=true}",
    "scf-forall-to-parallel",
    "convert-scf-to-openmp",
)

LLVM_PIPELINE = (
    "func.func(convert-vector-to-scf{full-unroll target-rank=1})",
    "expand-strided-metadata",
    "lower-affine",
    # Before scf-to-cf: the OpenMP conversion wraps loop bodies in single-block
    # memref.alloca_scope ops, which only the memref lowering may split into blocks.
    "finalize-memref-to-llvm",
    "convert-scf-to-cf",
    "canonicalize",
    "convert-openmp-to-llvm",
    "convert-vector-to-llvm{enable-x86vector enable-amx}",
    "finalize-memref-to-llvm",
    "convert-math-to-llvm",
    "convert-math-to-libm",
    "convert-index-to-llvm",
    "convert-arith-to-llvm",
    "convert-ub-to-llvm",
    "convert-cf-to-llvm",
    "convert-func-to-llvm",
    "convert-openmp-to-llvm",
    "reconcile-unrealized-casts",
    "canonicalize",
    "cse",
)


def new_context() -> ir.Context:
    """A fresh MLIR context with every upstream dialect registered and loadable."""
    ctx = ir.Context()
    ctx.allow_unregistered_dialects = False
    return ctx


def _run(module: ir.Module, passes: tuple[str, ...] | list[str]) -> None:
    with module.context:
        pm = passmanager.PassManager.parse("builtin.module(" + ",".join(passes) + ")")
        pm.run(module.operation)


def _public_funcs(module: ir.Module):
    for op in module.body.operations:
        if op.operation.name != "func.func":
            continue
        attrs = op.operation.attributes
        vis = attrs["sym_visibility"] if "sym_visibility" in attrs else None
        if vis is not None and ir.StringAttr(vis).value != "public":
            continue
        if len(op.operation.regions[0].blocks) == 0:  # declaration of an external function
            continue
        yield op


def add_c_interface(module: ir.Module) -> None:
    """Mark public defined functions so the object exports `_mlir_ciface_<name>`."""
    with module.context:
        for op in _public_funcs(module):
            op.operation.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()


def clone_module(module: ir.Module) -> ir.Module:
    """A deep copy of `module` in the same context (lowering mutates in place)."""
    with module.context:
        return ir.Module.parse(str(module))


def _apply_schedule(module: ir.Module) -> None:
    """Run and erase a transform-dialect schedule embedded by schedules.py (if any)."""
    from . import schedules

    schedules.run_embedded_schedule(module)


def lower(module: ir.Module, until: str = "llvm") -> ir.Module:
    """Lower a copy of `module` up to stage `until` (one of STAGES except 'llvmir')."""
    if until not in STAGES[:-1]:
        raise ValueError(f"lower: unknown stage {until!r}; expected one of {STAGES[:-1]}")
    mod = clone_module(module)
    if until == "mlir":
        return mod
    add_c_interface(mod)
    _apply_schedule(mod)
    if until == "scheduled":
        return mod
    _run(mod, BUFFERIZE_PIPELINE)
    from . import schedules

    schedules.lower_vectors(mod)
    if until == "bufferized":
        return mod
    _run(mod, OPENMP_PIPELINE)
    _dynamic_loops(mod)
    _run(mod, LLVM_PIPELINE)
    return mod


def _dynamic_loops(module: ir.Module) -> None:
    """Every omp.wsloop takes the dynamic schedule: the runtime hands out chunks from a shared
    counter (parallel_runtime.c), so neither a slowed-down thread nor a thread count other
    than the compile-time slice count leaves cores idle."""
    with module.context:
        dynamic = ir.Attribute.parse("#omp<schedulekind dynamic>")

        def visit(op):
            if op.name == "omp.wsloop":
                op.attributes["schedule_kind"] = dynamic
            return ir.WalkResult.ADVANCE

        module.operation.walk(visit)


def set_codegen_target(llvm_module: ir.Module, target: CpuTarget) -> None:
    """Give every llvm.func the target's CPU and features (LLVM's -mcpu / -mattr).

    The ExecutionEngine adds a `_mlir_<name>` wrapper per function with the host's attributes;
    a kernel inlined there would be compiled (and auto-vectorized) for the host, so kernels
    are kept out of line (their `_mlir_ciface_` entry points still inline them)."""
    with llvm_module.context:
        cpu = ir.StringAttr.get(target.llvm_cpu)
        feats = ir.Attribute.parse(
            "#llvm.target_features<[" + ", ".join(f'"{f}"' for f in target.llvm_features) + "]>")
        for op in llvm_module.body.operations:
            if op.operation.name != "llvm.func":
                continue
            attrs = op.operation.attributes
            attrs["target_cpu"] = cpu
            attrs["target_features"] = feats
            name = ir.StringAttr(attrs["sym_name"]).value
            if op.operation.regions[0].blocks and not name.startswith("_mlir_ciface_"):
                attrs["no_inline"] = ir.UnitAttr.get()


def _lower_for(module: ir.Module, target: CpuTarget | None) -> ir.Module:
    llvm_mod = lower(module, "llvm")
    set_codegen_target(llvm_mod, target or host_target())
    return llvm_mod


def _translate_to_llvmir(llvm_module: ir.Module) -> str:
    from mlir.dialects import llvm as llvm_d

    with llvm_module.context:
        return str(llvm_d.translate_module_to_llvmir(llvm_module.operation))


def stage_text(module: ir.Module, stage: str, target: CpuTarget | None = None) -> str:
    """IR text of `module` after `stage` ("mlir", "scheduled", "bufferized", "llvm", "llvmir")."""
    if stage not in STAGES:
        raise ValueError(f"stage_text: unknown stage {stage!r}; expected one of {STAGES}")
    if stage == "llvmir":
        return _translate_to_llvmir(_lower_for(module, target))
    return str(lower(module, stage))


def _cc() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("compile_to_shared_object: no C compiler (cc/gcc/clang) on PATH")
    return cc


def _runtime_artifact(kind: str) -> Path:
    """Compile parallel_runtime.c (with the runtime_support.c it includes) once per content
    hash: kind 'o' (hidden, AOT) or 'so' (JIT)."""
    src = _RUNTIME_C.read_bytes() + _RUNTIME_C.with_name("runtime_support.c").read_bytes()
    digest = hashlib.sha256(src + kind.encode()).hexdigest()[:16]
    from graphir.lowering.cache import cache_dir

    cache = cache_dir() / "cpu_rt"     # with the compile cache: $GRAPHIR_CACHE_DIR moves both
    out = cache / f"parallel_runtime-{digest}.{kind}"
    with _runtime_lock:
        if out.exists():
            return out
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        if kind == "o":
            cmd = [_cc(), "-O2", "-fPIC", "-DGRAPHIR_HIDDEN", "-c", str(_RUNTIME_C), "-o", str(tmp)]
        else:
            cmd = [_cc(), "-O2", "-fPIC", "-shared", str(_RUNTIME_C), "-o", str(tmp), "-lpthread"]
        subprocess.run(cmd, check=True, capture_output=True)
        os.replace(tmp, out)
    return out


def compile_to_shared_object(module: ir.Module, out_path: str | os.PathLike,
                             opt_level: int = 3, target: CpuTarget | None = None,
                             abi: str | None = None) -> Path:
    """Lower `module` to LLVM, emit an object for `target` (default: this host's CPU target)
    and link a self-contained .so. `abi`: a text the library returns from its exported
    `graphir_abi()` (runtime/cpu.py `CpuLibrary.abi`): what its kernels were compiled to
    expect, so that a loader can hold a manifest to the code itself.

    The result depends only on libc, libm and libpthread: no MLIR runtime library is needed.

    Example:
        >>> so = compile_to_shared_object(module, "/tmp/k.so")  # doctest: +SKIP
        >>> CpuLibrary(so).function("f", 2, 1)([a, b], [out])     # doctest: +SKIP
    """
    if opt_level not in (0, 1, 2, 3):
        raise ValueError(f"compile_to_shared_object: opt_level must be 0..3, got {opt_level!r}")
    out_path = Path(out_path)
    llvm_mod = _lower_for(module, target)
    rt_so = _runtime_artifact("so")
    with tempfile.TemporaryDirectory(prefix="graphir-cc-") as tmp:
        obj = Path(tmp) / "kernel.o"
        # The engine resolves symbols eagerly, hence the JIT copy of the runtime here.
        engine = ExecutionEngine(llvm_mod, opt_level=opt_level, shared_libs=[str(rt_so)],
                                 enable_pic=True)
        engine.dump_to_object_file(str(obj))
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_so = Path(tmp) / "out.so"
        abi_c = []
        if abi is not None:
            src = Path(tmp) / "abi.c"
            src.write_text(_abi_source(abi))
            abi_c = ["-fPIC", str(src)]
        cmd = [_cc(), "-shared", "-o", str(tmp_so), str(obj), str(_runtime_artifact("o")),
               *abi_c, "-Wl,--no-undefined", "-Wl,-z,noexecstack", "-lm", "-lpthread"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compile_to_shared_object: link failed:\n{res.stderr}")
        shutil.copyfile(tmp_so, out_path)
    return out_path


def _abi_source(text: str) -> str:
    """C source of `const char *graphir_abi(void)` returning `text` (escaped byte by byte:
    any text survives the C string literal)."""
    body = "".join(f"\\x{b:02x}" for b in text.encode())
    return f'const char *graphir_abi(void) {{ return "{body}"; }}\n'


def jit(module: ir.Module, opt_level: int = 3, target: CpuTarget | None = None) -> ExecutionEngine:
    """Lower `module` and JIT it (development only).

    Call as `engine.invoke(name, *[ctypes.pointer(ctypes.pointer(d)) for d in descriptors])`
    with runtime.cpu.make_descriptor(...) for inputs then preallocated outputs.
    """
    llvm_mod = _lower_for(module, target)
    return ExecutionEngine(llvm_mod, opt_level=opt_level,
                           shared_libs=[str(_runtime_artifact("so"))])
