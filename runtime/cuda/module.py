"""Modules, functions and launches with Triton's parameter layout.

A Triton 3.6 kernel's parameters are its non-constexpr arguments in order, then two `.u64`
pointers: `global_scratch` and `profile_scratch` (see lowering/triton_gpu/aot.py). Each
parameter is packed into its own ctypes value and cuLaunchKernel gets a `void**` array of
their addresses; blockDim is (32 * num_warps, 1, 1) and the dynamic shared memory is the
metadata's `shared`, which needs the function's max-dynamic-shared attribute raised above 48 KiB.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from ctypes import (c_double, c_float, c_int, c_int8, c_int16, c_int32, c_int64, c_uint8, c_uint16, c_uint32,
                    c_uint64, c_void_p)
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from graphir.runtime.cuda import driver
from graphir.runtime.cuda.stream import stream_handle

DEFAULT_SHARED_LIMIT = 48 * 1024  # above this a kernel must opt in (cuFuncSetAttribute)
SCRATCH_NAMES = ("global_scratch", "profile_scratch")

PARAM_CTYPES: dict[str, Any] = {
    "ptr": c_uint64, "i1": c_int8, "i8": c_int8, "i16": c_int16, "i32": c_int32, "i64": c_int64,
    "u1": c_uint8, "u8": c_uint8, "u16": c_uint16, "u32": c_uint32, "u64": c_uint64,
    "fp16": c_uint16, "bf16": c_uint16, "fp32": c_float, "fp64": c_double,
}
_ALIASES = {
    "pointer": "ptr", "f32": "fp32", "f16": "fp16", "f64": "fp64", "float32": "fp32",
    "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8", "int16": "i16",
    "int32": "i32", "int64": "i64", "uint8": "u8", "uint16": "u16", "uint32": "u32",
    "uint64": "u64",
}
_INT_RANGES = {k: (np.iinfo(t).min, np.iinfo(t).max) for k, t in
               (("i8", np.int8), ("i16", np.int16), ("i32", np.int32), ("i64", np.int64),
                ("u8", np.uint8), ("u16", np.uint16), ("u32", np.uint32), ("u64", np.uint64))}
_INT_RANGES.update({"i1": (-128, 127), "u1": (0, 1)})


def param_kind(ty: Any) -> str:
    """Normalize a parameter description to a kind: 'ptr', 'i32', 'u64', 'fp32', 'bf16', ...

    Accepts our kinds, Triton signature types ('*fp16', 'i32'), the `ctype` names of
    aot.launch_metadata ('pointer', 'int32') and dicts with a 'type' or 'ctype' entry.
    """
    if type(ty) is str and ty in PARAM_CTYPES:  # the common case, kept cheap
        return ty
    if isinstance(ty, Mapping):
        ty = ty.get("type", ty.get("ctype"))
    if not isinstance(ty, str):
        raise ValueError(f"kernel parameter kind must be a string, got {ty!r}")
    if ty.startswith("*"):
        return "ptr"
    kind = _ALIASES.get(ty, ty)
    if kind not in PARAM_CTYPES:
        raise ValueError(f"unsupported kernel parameter kind {ty!r}; expected a pointer ('*...' "
                         f"or 'ptr') or one of {sorted(PARAM_CTYPES)}")
    return kind


def _bf16_bits(x: float) -> int:
    bits = int(np.array(x, dtype=np.float32).view(np.uint32))
    if (bits & 0x7F800000) == 0x7F800000 and bits & 0x7FFFFF:
        return (bits >> 16) | 0x40  # keep NaN a NaN
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def _pointer_value(arg: Any) -> int:
    if arg is None:
        return 0
    if type(arg) is int or (isinstance(arg, (int, np.integer)) and not isinstance(arg, bool)):
        p = int(arg)
    elif type(getattr(arg, "ptr", None)) is int:
        p = arg.ptr
    elif callable(getattr(arg, "data_ptr", None)):
        p = int(arg.data_ptr())
    else:
        raise TypeError("expected a device pointer (int, DeviceBuffer, object with data_ptr() "
                        f"or None), got {type(arg).__name__}")
    if not 0 <= p < 2 ** 64:
        raise ValueError(f"pointer value {p} out of range")
    return p


def _pack(kind: str, arg: Any) -> Any:
    ct = PARAM_CTYPES[kind]
    if kind == "ptr":
        return ct(_pointer_value(arg))
    rng = _INT_RANGES.get(kind)
    if rng is not None:
        if not isinstance(arg, (int, np.integer)):
            raise TypeError(f"{kind} parameter needs an integer, got {type(arg).__name__}")
        if not rng[0] <= int(arg) <= rng[1]:
            raise ValueError(f"value {int(arg)} does not fit in {kind} [{rng[0]}, {rng[1]}]")
        return ct(int(arg))
    if not isinstance(arg, (int, float, np.integer, np.floating)) or isinstance(arg, bool):
        raise TypeError(f"{kind} parameter needs a number, got {type(arg).__name__}")
    if kind == "fp16":
        return ct(int(np.array(arg, dtype=np.float16).view(np.uint16)))
    if kind == "bf16":
        return ct(_bf16_bits(float(arg)))
    return ct(float(arg))


def pack_value(kind: Any, arg: Any, where: str = "parameter") -> Any:
    """One ctypes value holding `arg` as kernel parameter kind `kind`."""
    try:
        return _pack(param_kind(kind), arg)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None


class PackedParams:
    """Kernel parameters as ctypes values plus the `void*[]` of their addresses."""

    def __init__(self, kinds: Sequence[Any], args: Sequence[Any], names: Sequence[str] | None = None):
        kinds = [param_kind(k) for k in kinds]
        if len(args) != len(kinds):
            raise ValueError(f"kernel takes {len(kinds)} parameters {kinds}, got {len(args)} arguments")
        self.kinds = kinds
        try:
            self.values = [_pack(k, a) for k, a in zip(kinds, args)]
        except (TypeError, ValueError):
            # Redo one by one to name the offending parameter.
            names = list(names) if names is not None else [f"#{i}" for i in range(len(kinds))]
            for k, a, n in zip(kinds, args, names):
                pack_value(k, a, f"parameter {n} ({k})")
            raise
        self.array = (c_void_p * max(len(self.values), 1))(
            *[ctypes.addressof(v) for v in self.values])

    @property
    def pointer(self) -> int:
        """Address of the `void**` kernelParams array."""
        return ctypes.addressof(self.array)


def _unload_quietly(handle: int) -> None:
    driver.release("cuModuleUnload", c_void_p(handle))


class Module:
    """A loaded cubin (cuModuleLoadData)."""

    def __init__(self, image: bytes, device: int = 0):
        if not isinstance(image, (bytes, bytearray)) or not image:
            raise ValueError("Module needs a non-empty cubin (bytes)")
        driver.ensure_context(device)
        # NUL-terminated copy: cuModuleLoadData also accepts PTX text, which must end in NUL.
        data = ctypes.create_string_buffer(bytes(image), len(image) + 1)
        h = c_void_p()
        driver.call("cuModuleLoadData", ctypes.byref(h), data,
                    context=f"{len(image)}-byte image (an sm_90 cubin needs a compute 9.0 GPU)")
        self.handle, self.device = h.value, device
        self._finalizer = weakref.finalize(self, _unload_quietly, self.handle)

    def get_function(self, name: str) -> "Function":
        """The kernel named `name` (the mangled/entry name, e.g. Triton's `compiled.name`)."""
        h = c_void_p()
        driver.call("cuModuleGetFunction", ctypes.byref(h), c_void_p(self.handle), name.encode(),
                    context=f"function {name!r}")
        return Function(h.value, name, self)


class Function:
    """A kernel of a loaded module; keeps the module alive."""

    def __init__(self, handle: int, name: str, module: Module):
        self.handle, self.name, self.module = handle, name, module

    def attribute(self, attr: int) -> int:
        """Raw cuFuncGetAttribute value."""
        v = c_int()
        driver.call("cuFuncGetAttribute", ctypes.byref(v), int(attr), c_void_p(self.handle),
                    context=f"{self.name} attribute {attr}")
        return v.value

    @property
    def num_regs(self) -> int:
        return self.attribute(driver.FUNC_ATTR_NUM_REGS)

    @property
    def local_bytes(self) -> int:
        """Per-thread local memory (spills show up here)."""
        return self.attribute(driver.FUNC_ATTR_LOCAL_SIZE_BYTES)

    @property
    def static_shared_bytes(self) -> int:
        return self.attribute(driver.FUNC_ATTR_SHARED_SIZE_BYTES)

    @property
    def max_threads_per_block(self) -> int:
        return self.attribute(driver.FUNC_ATTR_MAX_THREADS_PER_BLOCK)

    def set_max_dynamic_shared(self, nbytes: int) -> None:
        """Allow launches with up to `nbytes` of dynamic shared memory (needed above 48 KiB)."""
        optin = driver.device_attribute(driver.ATTR_MAX_SHARED_PER_BLOCK_OPTIN, self.module.device)
        static = self.static_shared_bytes
        if nbytes + static > optin:
            raise ValueError(f"{self.name}: {nbytes} B dynamic + {static} B static shared memory "
                             f"exceeds the device's per-block opt-in limit of {optin} B")
        driver.call("cuFuncSetAttribute", c_void_p(self.handle),
                    driver.FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(nbytes),
                    context=f"{self.name} max dynamic shared = {nbytes}")


def _grid3(grid: Sequence[int] | int) -> tuple[int, int, int]:
    g = (grid,) if isinstance(grid, int) else tuple(grid)
    if not 1 <= len(g) <= 3:
        raise ValueError(f"grid must have 1 to 3 dimensions, got {grid!r}")
    g = tuple(int(x) for x in g) + (1,) * (3 - len(g))
    if any(x < 0 for x in g) or g[0] >= 2 ** 31 or g[1] > 65535 or g[2] > 65535:
        raise ValueError(f"grid {g} out of range (x < 2**31, y and z <= 65535, none negative)")
    return g


def launch(function: Function, grid: Sequence[int] | int, block: Sequence[int],
           params: PackedParams, shared: int = 0, stream: Any = None,
           pdl: bool = False) -> None:
    """cuLaunchKernel with packed parameters (cuLaunchKernelEx with programmatic stream
    serialization when `pdl`); an empty grid launches nothing."""
    g = _grid3(grid)
    b = tuple(int(x) for x in block) + (1,) * (3 - len(block))
    if g[0] * g[1] * g[2] == 0:
        return
    if pdl:
        PdlLaunch(function.handle, g, b, int(shared))(stream_handle(stream), params.pointer,
                                                      function.name)
        return
    rc = driver.function("cuLaunchKernel")(function.handle, *g, *b, int(shared),
                                           stream_handle(stream), params.pointer, None)
    if rc:  # the message is built only on failure: launches are on the hot path
        driver.check("cuLaunchKernel", rc, f"{function.name} grid={g} block={b} shared={shared}")


# cuda.h: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION; its value is one unsigned
# int (programmaticStreamSerializationAllowed) at the start of a 64-byte union.
_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", c_int), ("pad", ctypes.c_char * 4), ("value", c_uint32),
                ("value_pad", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared", ctypes.c_uint), ("stream", c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


class PdlLaunch:
    """cuLaunchKernelEx of one function, grid, block and shared size with programmatic stream
    serialization allowed: the kernel may start while the one before it in the stream is
    still running. Only for cubins whose PTX waits for their predecessors before touching
    global memory (launch metadata `launch_pdl`, lowering/triton_gpu/kernels/pdl.py).
    Built once; `p(stream, params_pointer)` launches."""

    __slots__ = ("_fn", "_handle", "_attr", "_config", "_ref")

    def __init__(self, handle: int, grid: tuple[int, int, int], block: tuple[int, int, int],
                 shared: int):
        self._fn = driver.function("cuLaunchKernelEx")
        self._handle = handle
        self._attr = _LaunchAttribute(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        self._config = _LaunchConfig(*grid, *block, shared, None,
                                     ctypes.pointer(self._attr), 1)
        self._ref = ctypes.byref(self._config)

    def __call__(self, stream: int, params: Any, name: str = "kernel") -> None:
        self._config.stream = stream
        rc = self._fn(self._ref, self._handle, params, None)
        if rc:
            c = self._config
            driver.check("cuLaunchKernelEx", rc,
                         f"{name} grid={(c.grid_x, c.grid_y, c.grid_z)} "
                         f"block={(c.block_x, c.block_y, c.block_z)} shared={c.shared} (PDL)")


def early_read_indices(md: Mapping[str, Any]) -> tuple[int, ...]:
    """The parameter indices a kernel's launch metadata names in `pdl_early_reads` (the
    pointers it loads before its PDL wait); ValueError for a name it has no parameter of."""
    early = md.get("pdl_early_reads") or ()
    if not early:
        return ()
    names = [p.get("name") if isinstance(p, Mapping) else None for p in md["params"]]
    missing = [n for n in early if n not in names]
    if missing:
        raise ValueError(f"{md['name']}: pdl_early_reads names {missing}, not parameters of "
                         f"the kernel ({names})")
    return tuple(names.index(n) for n in early)


def pdl_enabled() -> bool:
    """Whether kernels compiled for it launch with programmatic stream serialization
    (GRAPHIR_PDL=0 turns it off, e.g. to measure what it gains)."""
    return os.environ.get("GRAPHIR_PDL", "1") != "0"


@dataclass(frozen=True)
class LaunchSpec:
    """How to launch one kernel: its user parameter kinds and launch resources."""

    name: str
    params: tuple[str, ...]
    num_warps: int = 4
    shared: int = 0
    num_ctas: int = 1
    triton_scratch: bool = True  # append Triton's global/profile scratch pointer params
    global_scratch_size: int = 0
    global_scratch_align: int = 1
    profile_scratch_size: int = 0
    profile_scratch_align: int = 1
    param_names: tuple[str, ...] | None = None
    # Launch with programmatic stream serialization (the cubin waits for its predecessors
    # before any global access: aot.compile_kernel's `launch_pdl`).
    pdl: bool = False
    # Indices of the pointer parameters it loads before that wait (`pdl_early_reads`): such
    # a kernel is launched early only when the caller vouches that nothing ahead of it in
    # the stream writes them (Kernel.prepare's `early`).
    early_reads: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(param_kind(p) for p in self.params))
        if self.num_warps < 1 or self.num_warps * 32 > 1024:
            raise ValueError(f"{self.name}: num_warps={self.num_warps} must be in [1, 32]")
        if self.shared < 0:
            raise ValueError(f"{self.name}: shared={self.shared} must be >= 0")
        if self.num_ctas != 1:
            raise ValueError(f"{self.name}: num_ctas={self.num_ctas} needs a cluster launch, "
                             "which runtime.cuda does not support; compile with num_ctas=1")
        if (self.global_scratch_size or self.profile_scratch_size) and not self.triton_scratch:
            raise ValueError(f"{self.name}: scratch sizes given but triton_scratch=False")

    @property
    def block(self) -> tuple[int, int, int]:
        return (32 * self.num_warps, 1, 1)

    @property
    def all_params(self) -> tuple[str, ...]:
        """Kinds of every kernel parameter, scratch pointers included."""
        return self.params + (("ptr", "ptr") if self.triton_scratch else ())

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "LaunchSpec":
        """From `CompiledCubin.launch_metadata()` (lowering/triton_gpu/aot.py) or a similar dict.

        If the parameter list ends with entries named global_scratch/profile_scratch they are
        the Triton scratch params; a list of plain kinds is the user params only, and
        `triton_scratch` (default True) says whether the scratch pair follows.
        """
        raw = list(md["params"])
        names = [p.get("name") if isinstance(p, Mapping) else None for p in raw]
        scratch = bool(md.get("triton_scratch", True))
        if tuple(names[-2:]) == SCRATCH_NAMES:
            raw, names, scratch = raw[:-2], names[:-2], True
        if md.get("launch_cooperative_grid"):
            raise ValueError(f"{md['name']}: cooperative-grid launches are not supported")
        block = md.get("block")
        num_warps = int(md.get("num_warps", (block[0] // 32) if block else 4))
        return cls(
            name=str(md["name"]), params=tuple(raw), num_warps=num_warps,
            shared=int(md.get("shared", 0)), num_ctas=int(md.get("num_ctas", 1)),
            triton_scratch=scratch,
            global_scratch_size=int(md.get("global_scratch_size") or 0),
            global_scratch_align=int(md.get("global_scratch_align") or 1),
            profile_scratch_size=int(md.get("profile_scratch_size") or 0),
            profile_scratch_align=int(md.get("profile_scratch_align") or 1),
            param_names=tuple(names) if all(names) else None,
            pdl=bool(md.get("launch_pdl")) and pdl_enabled(),
            early_reads=early_read_indices(md))

    @classmethod
    def from_triton(cls, compiled: Any, param_types: Sequence[str] | None = None) -> "LaunchSpec":
        """From a `triton.compile(...)` result (read by attribute; triton is not imported).

        `param_types` are the non-constexpr signature types; by default they are read from
        `compiled.src.signature`.
        """
        md = compiled.metadata
        if param_types is None:
            sig = getattr(getattr(compiled, "src", None), "signature", None)
            if sig is None:
                raise ValueError("pass param_types: the compiled kernel carries no signature")
            param_types = [t for t in sig.values() if t != "constexpr"]
        return cls.from_metadata({
            "name": compiled.name, "params": list(param_types), "num_warps": md.num_warps,
            "shared": md.shared, "num_ctas": getattr(md, "num_ctas", 1),
            "global_scratch_size": getattr(md, "global_scratch_size", 0),
            "global_scratch_align": getattr(md, "global_scratch_align", 1),
            "profile_scratch_size": getattr(md, "profile_scratch_size", 0),
            "profile_scratch_align": getattr(md, "profile_scratch_align", 1),
            "launch_cooperative_grid": getattr(md, "launch_cooperative_grid", False)})
