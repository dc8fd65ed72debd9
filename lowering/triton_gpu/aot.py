"""Offline (no GPU) compilation of Triton kernels to sm_90 cubins with launch metadata.

Triton 3.6 appends two pointer parameters to every kernel after the user's non-constexpr
arguments: `global_scratch` and `profile_scratch` (both `.u64` global pointers, in that order).
A launcher must always pass them; when the matching `*_scratch_size` is 0 a null pointer is fine,
otherwise it must pass `grid_x*grid_y*grid_z*num_ctas*size` bytes aligned to `*_scratch_align`.
Kernels with more than 48 KiB of shared memory need `cuFuncSetAttribute(
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)` before launch, and the launch passes
`shared` as its dynamic shared memory size with blockDim = (32 * num_warps, 1, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

from graphir.lowering.triton_gpu.kernels.pdl import waits_before_memory
from graphir.lowering.triton_gpu.kernels.spec import KernelSpec

SM90 = GPUTarget("cuda", 90, 32)
SCRATCH_PARAMS = (("global_scratch", "*i8"), ("profile_scratch", "*i8"))
# Hopper's opt-in per-block limit: 227 KiB.
MAX_SHARED_SM90 = 227 * 1024

_PARAM_CTYPES = {
    "i1": "int8", "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "u1": "uint8", "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
    "fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64",
}


@dataclass
class CompiledCubin:
    """A compiled kernel: binary, name, resources, parameter list and IR text of each stage."""

    name: str
    cubin: bytes
    shared: int
    num_warps: int
    num_stages: int
    num_ctas: int
    params: list[tuple[str, str]]
    global_scratch_size: int
    global_scratch_align: int
    profile_scratch_size: int
    profile_scratch_align: int
    launch_cooperative_grid: bool
    launch_pdl: bool
    target: str
    asm: dict[str, str] = field(default_factory=dict)
    maxnreg: int | None = None  # the register cap it was compiled with (None: ptxas chose)
    # Pointer parameters it loads before its PDL wait (kernels/pdl.py); a launcher lets it
    # start early only where nothing ahead of it writes them.
    pdl_early_reads: tuple[str, ...] = ()

    @property
    def ptx(self) -> str:
        return self.asm["ptx"]

    @property
    def ttir(self) -> str:
        return self.asm["ttir"]

    @property
    def ttgir(self) -> str:
        return self.asm["ttgir"]

    def stage(self, name: str) -> str:
        """IR text of one stage: 'triton'/'ttir', 'ttgir', 'llir' or 'ptx'."""
        key = {"triton": "ttir"}.get(name, name)
        if key not in self.asm:
            raise ValueError(f"unknown Triton stage {name!r}; have {sorted(self.asm)}")
        return self.asm[key]

    def launch_metadata(self) -> dict[str, Any]:
        """JSON-able metadata a libcuda launcher needs (cubin bytes excluded)."""
        return {
            "name": self.name, "shared": self.shared, "num_warps": self.num_warps,
            "block": [32 * self.num_warps, 1, 1], "num_ctas": self.num_ctas,
            "params": [{"name": n, "type": t, "ctype": param_ctype(t)} for n, t in self.params],
            "global_scratch_size": self.global_scratch_size,
            "global_scratch_align": self.global_scratch_align,
            "profile_scratch_size": self.profile_scratch_size,
            "profile_scratch_align": self.profile_scratch_align,
            "launch_cooperative_grid": self.launch_cooperative_grid,
            "launch_pdl": self.launch_pdl, "target": self.target, "maxnreg": self.maxnreg,
            **({"pdl_early_reads": list(self.pdl_early_reads)} if self.pdl_early_reads else {}),
        }


def param_ctype(ty: str) -> str:
    """C-level kind of a signature type: 'pointer' or a fixed-width scalar name."""
    if ty.startswith("*"):
        return "pointer"
    if ty not in _PARAM_CTYPES:
        raise ValueError(f"unsupported kernel parameter type {ty!r}")
    return _PARAM_CTYPES[ty]


def compile_kernel(fn: Any, signature: Mapping[str, str], constexprs: Mapping[str, Any],
                   num_warps: int = 4, num_stages: int = 3, target: GPUTarget = SM90,
                   divisible_by_16: tuple[str, ...] = (),
                   maxnreg: int | None = None,
                   pdl_early_reads: tuple[str, ...] = ()) -> CompiledCubin:
    """Compile a `@triton.jit` (or `@gluon.jit`) function for `target` without touching a GPU.

    `signature` names every argument of `fn` (constexprs as "constexpr"); `divisible_by_16`
    lists arguments the binary may assume are multiples of 16; `maxnreg` caps the registers
    per thread (Triton's compile option of that name); `pdl_early_reads` names the pointer
    arguments the kernel loads before its PDL wait (kernels/pdl.py).
    """
    if maxnreg is not None and not (isinstance(maxnreg, int) and 16 <= maxnreg <= 255):
        raise ValueError(f"{fn.__name__}: maxnreg must be an int in [16, 255], got {maxnreg!r}")
    names = list(fn.arg_names)
    if list(signature) != names:
        raise ValueError(f"{fn.__name__}: signature keys {list(signature)} != arguments {names}")
    for k, v in signature.items():
        if (v == "constexpr") != (k in constexprs):
            raise ValueError(f"{fn.__name__}: argument {k!r} is constexpr in only one of "
                             "signature/constexprs")
    attrs = {}
    for k in divisible_by_16:
        if k not in signature or signature[k] == "constexpr":
            raise ValueError(f"{fn.__name__}: divisible_by_16 names unknown/constexpr arg {k!r}")
        attrs[(names.index(k),)] = [["tt.divisibility", 16]]
    runtime = [k for k, v in signature.items() if v != "constexpr"]
    for k in pdl_early_reads:
        if k not in runtime or not signature[k].startswith("*"):
            raise ValueError(f"{fn.__name__}: pdl_early_reads names {k!r}, not a pointer "
                             "argument")
    # Gluon kernels (explicit layouts, TMA rings, warp specialization) compile through their
    # own front end; everything after the TTGIR is the same.
    source = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
    src = source(fn, dict(signature), dict(constexprs), attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(src, target=target, options=options)
    md = compiled.metadata
    params = [(k, v) for k, v in signature.items() if v != "constexpr"] + list(SCRATCH_PARAMS)
    asm = {k: v for k, v in compiled.asm.items() if isinstance(v, str)}
    return CompiledCubin(
        name=compiled.name, cubin=bytes(compiled.kernel), shared=int(md.shared),
        num_warps=int(md.num_warps), num_stages=int(md.num_stages), num_ctas=int(md.num_ctas),
        params=params, global_scratch_size=int(md.global_scratch_size or 0),
        global_scratch_align=int(md.global_scratch_align or 1),
        profile_scratch_size=int(md.profile_scratch_size or 0),
        profile_scratch_align=int(md.profile_scratch_align or 1),
        launch_cooperative_grid=bool(md.launch_cooperative_grid),
        # Launched with programmatic stream serialization only when the kernel waits for its
        # predecessors before it touches global memory, bar loads of `pdl_early_reads`
        # (kernels/pdl.py; PTX parameter i is the i-th runtime argument).
        launch_pdl=waits_before_memory(asm.get("ptx", ""),
                                       tuple(runtime.index(k) for k in pdl_early_reads)),
        target=f"{target.backend}:{target.arch}", asm=asm,
        maxnreg=maxnreg, pdl_early_reads=tuple(pdl_early_reads))


def compile_spec(spec: KernelSpec, target: GPUTarget = SM90) -> CompiledCubin:
    """Compile one `KernelSpec`."""
    return compile_kernel(spec.fn, spec.signature, spec.constexprs, spec.num_warps,
                          spec.num_stages, target, spec.divisible_by_16, spec.maxnreg,
                          spec.pdl_early_reads)
