"""Description of one ahead-of-time specialization of a Triton kernel.

A `KernelSpec` is everything the offline compiler (`lowering.triton_gpu.aot`) and a Triton-free
CUDA launcher need: the JIT function, the signature (every argument, constexprs marked
"constexpr"), the constexpr values, the warps and pipeline depth, and the grid as a pure function
of the problem sizes. Pointer arguments of integer index tensors (row offsets, cache lengths, the
page lookup table) are declared `*i32`: the runtime passes the uint32 buffers unchanged, which is
bit-identical for values below 2**31.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class KernelSpec:
    """One cubin to build: function, signature, constexprs, launch shape and grid rule."""

    name: str
    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int
    num_stages: int
    grid: Callable[..., tuple[int, int, int]]
    grid_args: tuple[str, ...]
    # Arguments the cubin assumes are multiples of 16 (addresses for pointers, values for ints);
    # a launcher must check them before using this specialization.
    divisible_by_16: tuple[str, ...] = ()
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Register cap per thread (ptxas -maxrregcount via Triton's `maxnreg`), or None: a lower
    # cap lets more CTAs share an SM at the price of spills.
    maxnreg: int | None = None
    # Pointer arguments the kernel loads before its PDL wait (kernels/pdl.py): buffers no
    # kernel ahead of it writes (a weight, a graph input). The offline compiler checks the
    # PTX against it; the runtime launches it early only where the buffers passed are such.
    pdl_early_reads: tuple[str, ...] = ()

    def runtime_params(self) -> list[tuple[str, str]]:
        """The (name, type) list of launch parameters in order, constexprs removed."""
        return [(k, v) for k, v in self.signature.items() if v != "constexpr"]

    def interpretable(self) -> "KernelSpec":
        """The spec Triton's interpreter runs for this one: itself, or for a Gluon kernel (no
        interpreter) its Triton twin, which takes the same arguments (extra["twin"])."""
        return self.extra.get("twin", self)

    def grid_for(self, **sizes: int) -> tuple[int, int, int]:
        """Evaluate the grid rule; raises ValueError naming a missing problem size."""
        missing = [a for a in self.grid_args if a not in sizes]
        if missing:
            raise ValueError(f"{self.name}: grid needs sizes {missing}")
        return self.grid(**{a: sizes[a] for a in self.grid_args})


# SMs of the H100 / H200 SXM: persistent grids (the matmul's, the prefill kernel's) and the
# decode split rule size themselves to it; a grid sized for another count is still correct.
NUM_SMS = 132


def torch_global_scratch(device) -> None:
    """For kernels launched through Triton's own launcher on torch tensors (tests, sweeps): take
    a kernel's global scratch, where a TMA descriptor made on the device lives, from torch's
    allocator on `device`. (The plan's launcher, runtime.cuda, brings its own scratch.)"""
    import torch
    import triton

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device=device))


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    p = 1
    while p < n:
        p *= 2
    return p


def triton_dtype(name: str) -> str:
    """Map a graphir / torch dtype name to a Triton signature element type."""
    table = {
        "float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16",
        "bfloat16": "bf16", "bf16": "bf16", "float8_e4m3fn": "fp8e4nv", "fp8e4nv": "fp8e4nv",
        "int32": "i32", "uint32": "i32", "int64": "i64",
    }
    if name not in table:
        raise ValueError(f"unsupported dtype for a Triton kernel: {name!r}")
    return table[name]
